"""Project settings: Kedro's defaults, with the `local` environment on top of `base`."""

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
