"""The ``kmrun`` command: subcommand words, or Hydra overrides for a run or a sweep.

The command parses, calls into the package, and turns ``KmrunError`` into one clear
message and exit code 2. No logic lives here.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import TYPE_CHECKING

from .errors import JobFailed, KmrunError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from .job import JobResult
    from .sweep import SweepOutcome

USAGE = """\
usage: kmrun [-v] [OVERRIDE ...]            run one experiment
       kmrun -m [-v] [OVERRIDE ...]         run a sweep: a grid, or an Optuna study

Examples:
  kmrun +experiment=baseline                              one experiment
  kmrun +experiment=baseline params.model.C=0.5           override a Kedro parameter
  kmrun +experiment=baseline model=random_forest          swap the model section

Overrides use Hydra's syntax. `params.KEY=VALUE` overrides a Kedro parameter and is
checked against the project's parameters; `+params.KEY=VALUE` adds a new one on purpose.
kmrun reads conf/kmrun.yaml in the working directory (or -cp DIR). Every key is
documented in docs/config.md.

Options:
  -v, --verbose     show Kedro's node-by-node log and full tracebacks
  -h, --help        this help, then the config groups of conf/ (Hydra's --help)
  --hydra-help      Hydra's own flags (-cp, -cn, --cfg job, --info, ...)

Exit codes: 0 success · 1 the pipeline failed · 2 bad input · 130 interrupted
"""

VERBOSE_FLAGS = ("-v", "--verbose")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in VERBOSE_FLAGS for a in args)
    args = [a for a in args if a not in VERBOSE_FLAGS]
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return _hydra_help(args)
    from . import terminal

    multirun = any(a in ("-m", "--multirun") for a in args)
    signal.signal(signal.SIGTERM, _interrupt)  # end runs KILLED, as on Ctrl-C
    try:
        if multirun:
            return run_many(args, verbose).exit_code
        result = run_once(args, verbose)
    except KeyboardInterrupt:
        if not multirun:
            terminal.error("Interrupted: the run is marked KILLED.")
        return 130
    except (KmrunError, JobFailed) as err:
        if verbose or os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        terminal.error(str(err))
        return err.exit_code
    return 0 if result.status == "FINISHED" else 1


def run_once(args: list[str], verbose: bool = False) -> JobResult:
    """Compose, check and run one job; print its summary. The API behind ``runner.run``."""
    from . import compose, job, terminal

    def task(cfg: DictConfig) -> JobResult:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        loud = verbose or bool(cfg.get("verbose", False))
        with terminal.quiet_unless(loud):  # Kedro logs its set-up at INFO while it bootstraps
            spec = job.prepare(cfg, compose.as_typed(list(hydra.overrides.task)), hydra.runtime.choices, compose.config_dir(args))
        terminal.setup_logging(loud)
        terminal.header(spec, job.open_project(spec.conf.kedro.project_path, spec.conf.kedro.env).env_name)
        result = job.execute(spec)
        terminal.run_summary(spec, result)
        if result.status != "FINISHED":
            raise (KmrunError if result.exit_code == 2 else JobFailed)(
                f"{result.error}\nThe run {result.run_id} is {result.status}; "
                "its traceback is the artifact traceback.txt."
            )
        return result

    try:
        return compose.launch(args, task)  # type: ignore[no-any-return]
    except (KmrunError, JobFailed, KeyboardInterrupt):
        raise
    except Exception as err:
        if _is_config_error(err):
            raise compose.hydra_error(err) from err
        raise


def run_many(args: list[str], verbose: bool = False) -> SweepOutcome:
    """Run a sweep through Hydra's multirun and kmrun's sweeper; return its outcome."""
    from . import compose, sweep, terminal

    terminal.VERBOSE = verbose
    terminal.setup_logging(verbose)
    try:
        with terminal.quiet_unless(verbose):
            compose.launch(args, lambda cfg: None)
    except (KmrunError, JobFailed, KeyboardInterrupt):
        raise
    except Exception as err:
        if _is_config_error(err):
            raise compose.hydra_error(err) from err
        raise
    if not sweep.outcomes:
        raise KmrunError("-m ran no sweep: is `override hydra/sweeper: kmrun` in conf/kmrun.yaml's defaults?")
    return sweep.outcomes[-1]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _is_config_error(err: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    return isinstance(err, (HydraException, OmegaConfBaseException, YAMLError))


def _hydra_help(args: list[str]) -> int:
    from . import compose

    if not (compose.config_dir(args) / f"{compose.CONFIG_NAME}.yaml").is_file():
        return 0
    try:
        compose.launch(args, lambda cfg: None)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
