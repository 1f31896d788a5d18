"""Hydra composition of kmrun's config.

``Composer`` runs Hydra's compose API on kmrun's config directory: config groups, the
override and sweep grammar and defaults lists work as in any Hydra app, but Hydra writes
nothing to disk, configures no logging, and needs no Hydra section in the user's config.
Where a key came from (``origin_finder``) names the file in errors. The overrides under
``params`` are checked against the Kedro project in ``params``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .errors import ConfigError

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig


CONFIG_NAME = "kmrun"


GROUP_NAMES = ("model",)  # kmrun sections whose name is also a common config group (conf/model/)


def hydra_args(argv: list[str]) -> list[str]:
    """The command line as Hydra should see it.

    Overrides of kmrun's sections may name keys the composed config has not set yet
    (``params.x`` names a Kedro parameter; ``sweep.n_jobs`` has a schema default), so
    they become ``++key=value``: kmrun checks them itself, against Kedro and against its
    schema, with better messages than Hydra's struct mode. ``+params.x`` keeps its
    meaning: a parameter added on purpose, not checked.
    """
    from .schema import SECTIONS

    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        whole = "." not in key and key in GROUP_NAMES  # `model=random_forest` picks a config group
        if "=" in arg and key.split(".", 1)[0] in SECTIONS and key[:1] not in ("+", "~") and not whole:
            arg = "++" + arg
        out.append(arg)
    return out


def as_typed(overrides: list[str]) -> list[str]:
    """Overrides as the user wrote them (undoes the ``++`` that ``hydra_args`` added)."""
    from .schema import SECTIONS

    def section(override: str) -> str:
        return override[2:].split(".", 1)[0].split("=", 1)[0]

    return [o[2:] if o.startswith("++") and section(o) in SECTIONS else o for o in overrides]


MAX_KEY_PART = 200  # characters between dots in an override key (file names stop at 255)
SYNTAX_HELP = (
    "Write KEY=VALUE; sweep values as a,b,c · range(START,STOP[,STEP]) · choice(a,b) · "
    "interval(LOW,HIGH) · int(interval(LOW,HIGH)) · tag(log, interval(LOW,HIGH)), quoted for the shell."
)


class Composer:
    """Hydra's compose API on one config directory, for one ``run`` or ``sweep`` call.

    Hydra keeps its state in a process-wide singleton; a ``Composer`` holds it only inside
    its ``with`` block and leaves it as it found it, so calls can repeat in one process.
    """

    def __init__(self, config_dir: Path | None = None, config_name: str = CONFIG_NAME,
                 extra_dir: Path | None = None) -> None:
        self.config_name = config_name
        self.looked: list[Path] = []
        if config_dir is not None:
            self.config_dir, self.base_dir = config_dir.resolve(), Path.cwd()
        else:
            self.config_dir, self.looked = find_config_dir(config_name)
            self.base_dir = self.config_dir.parent  # relative paths in the config start here
        self.extra = [f"hydra.searchpath=[file://{extra_dir.resolve()}]"] if extra_dir else []
        self._context: Any = None

    def __enter__(self) -> Composer:
        from hydra import initialize_config_dir

        if not (self.config_dir / f"{self.config_name}.yaml").is_file():
            where = (f"{self.config_dir}" if not self.looked else
                     f"{self.looked[0]} or its parents' conf/ ({len(self.looked)} folders up to {self.looked[-1]})")
            raise ConfigError(
                f"No {self.config_name}.yaml in {where}: run kmrun inside a Kedro project "
                "that has conf/kmrun.yaml (kmrun init writes one), or point -cp at its config dir."
            )
        for path in sorted(self.config_dir.rglob("*.yaml")):
            _check_expansion(path)
        self._context = initialize_config_dir(config_dir=str(self.config_dir), version_base="1.3", job_name="kmrun")
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)

    def compose(self, overrides: list[str]) -> DictConfig:
        """The config for ``overrides`` (as typed), with Hydra's section (its group choices)."""
        from hydra import compose

        self.parse(overrides)  # an error names the override
        _restore_env_resolver()
        try:
            cfg = compose(self.config_name, hydra_args(overrides) + self.extra, return_hydra_config=True)
        except Exception as err:
            if is_config_error(err):
                raise hydra_error(err) from err
            raise
        _check_hydra_plugins(choices_of(cfg))
        return cfg

    def parse(self, lines: list[str]) -> list[Override]:
        """Hydra's own override parser, one line at a time, so that an error names its line."""
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
        parser = OverridesParser.create(config_loader=loader)
        parsed = []
        for line in hydra_args(lines):
            key = line.partition("=")[0].lstrip("+~")
            long = next((part for part in key.replace("/", ".").split(".") if len(part) > MAX_KEY_PART), None)
            if long is not None:  # Hydra looks a key up as a file name first, and the file system refuses
                raise ConfigError(f"Override key '{key[:60]}…' has a part of {len(long)} characters; kmrun takes "
                                  f"at most {MAX_KEY_PART} per part (between dots). Shorten the name.")
            try:
                parsed.append(parser.parse_override(line))
            except HydraException as err:
                typed = as_typed([line])[0]
                key, _, value = typed.partition("=")
                hint = (f"\nA value holding '=' (a URL's query, say) must be quoted: {key}='{value}'"
                        if "=" in value and value[:1] not in "'\"" else "")
                raise ConfigError(
                    f"Bad override or sweep expression '{typed}': "
                    f"{str(err).strip().splitlines()[0]}{hint}\n{SYNTAX_HELP}"
                ) from None
        return parsed

    def groups(self) -> dict[str, list[str]]:
        """The config groups of the config directory and their options (``experiment: [a, b]``)."""
        from hydra.core.global_hydra import GlobalHydra

        loader = GlobalHydra.instance().config_loader()
        found: dict[str, list[str]] = {}

        def walk(parent: str) -> None:
            for group in sorted(loader.list_groups(parent)):
                name = f"{parent}/{group}" if parent else group
                if name.split("/")[0] == "hydra":
                    continue
                options = loader.get_group_options(name)
                if options:
                    found[name] = list(options)
                walk(name)

        walk("")
        return found


def default_groups(conf_dir: Path, config_name: str = CONFIG_NAME) -> set[str]:
    """The config groups the primary config's defaults list picks (``model: ...``): those an
    experiment file may ``override``."""
    from omegaconf import OmegaConf

    try:
        primary = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{config_name}.yaml"))
    except (OSError, ValueError):
        return set()
    defaults = primary.get("defaults", []) if isinstance(primary, dict) else []
    return {str(key).removeprefix("override ").lstrip("/") for entry in defaults if isinstance(entry, dict)
            for key in entry}


def find_config_dir(config_name: str = CONFIG_NAME) -> tuple[Path, list[Path]]:
    """``conf/`` holding ``<config_name>.yaml`` in the working directory or the nearest
    parent, as git finds ``.git``; ``./conf`` when there is none. Also where it looked."""
    looked = []
    for folder in (Path.cwd(), *Path.cwd().parents):
        looked.append(folder / "conf")
        if (folder / "conf" / f"{config_name}.yaml").is_file():
            return folder / "conf", looked
    return Path.cwd() / "conf", looked


def _check_hydra_plugins(choices: dict[str, Any]) -> None:
    """Hydra's launchers and other sweepers would be ignored: kmrun runs jobs itself."""
    launcher, sweeper = choices.get("hydra/launcher"), choices.get("hydra/sweeper")
    if launcher not in (None, "basic"):
        raise ConfigError(
            f"hydra/launcher={launcher}: kmrun runs its jobs itself and does not use Hydra's launchers.\n"
            "Jobs in parallel on this machine: sweep.n_jobs=N (or study.n_jobs=N); on several machines: start "
            "kmrun on each with the same stores (README, Many machines). Remove hydra/launcher from the command "
            "line or the defaults list."
        )
    if sweeper not in (None, "basic", "kmrun"):
        raise ConfigError(
            f"hydra/sweeper={sweeper}: kmrun sweeps itself: a grid with -m, an Optuna study with -m +study=NAME. "
            "Remove hydra/sweeper from the command line or the defaults list."
        )


def without_hydra(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """The config without its ``hydra`` section (big, and no job reads it), and the choices."""
    from omegaconf import OmegaConf

    choices = choices_of(cfg)
    return OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]), choices


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as plain data, interpolations resolved, without Hydra's section
    (resolved before Kedro loads its config, which unregisters OmegaConf's oc.env resolver)."""
    from omegaconf import OmegaConf

    job_cfg = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    config = cast(dict[str, Any], OmegaConf.to_container(job_cfg, resolve=True))
    assert isinstance(config, dict)
    return config


def choices_of(cfg: DictConfig) -> dict[str, Any]:
    """The config group choices Hydra made (``{"model": "logistic_regression"}``)."""
    from omegaconf import OmegaConf

    hydra = cfg.get("hydra")
    if hydra is None:
        return {}
    return dict(OmegaConf.to_container(hydra.runtime.choices))  # type: ignore[arg-type]


def is_config_error(err: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    return isinstance(err, (HydraException, OmegaConfBaseException, YAMLError))


MAX_YAML_NODES = 200_000  # a config this large once its aliases are expanded is an alias bomb


def _check_expansion(path: Path) -> None:
    """YAML aliases (``*name``) share a node, but OmegaConf copies each one: a few lines of
    nested aliases would expand to billions of nodes and hang. Count before composing."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return  # Hydra reports a broken file with its own message
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a recursive alias counts once
            children = node.value if isinstance(node.value, list) else []
            parts = [item for pair in children for item in pair] if isinstance(node, yaml.MappingNode) else children
            sizes[id(node)] = min(1 + sum(size(child) for child in parts), MAX_YAML_NODES * 10)
        return sizes[id(node)]

    if root is not None and size(root) > MAX_YAML_NODES:
        raise ConfigError(
            f"{_shown(path)}: its YAML aliases (*name) expand to more than {MAX_YAML_NODES:,} values. "
            "Write the values out, or use fewer nested aliases."
        )


def _restore_env_resolver() -> None:
    """Kedro's config loader unregisters OmegaConf's ``oc.env`` for the whole process; a
    config composed after a Kedro run in the same process still needs it."""
    from omegaconf import OmegaConf
    from omegaconf.resolvers import oc

    if not OmegaConf.has_resolver("oc.env"):
        OmegaConf.register_new_resolver("oc.env", oc.env)


def origin_finder(conf_dir: Path, overrides: list[str], choices: Mapping[str, Any]) -> Callable[[str], str]:
    """A function telling where a composed key was set: the command line or a file."""
    from omegaconf import OmegaConf

    files = [(conf_dir / f"{CONFIG_NAME}.yaml", "")]
    for group, option in choices.items():
        if option is None or str(group).startswith("hydra"):
            continue
        files.append((conf_dir / str(group) / f"{option}.yaml", str(group).replace("/", ".")))

    parsed: list[tuple[Path, str, Any]] = []  # (file, its package, its content), read on first use

    def read() -> list[tuple[Path, str, Any]]:
        if not parsed:
            for path, group_package in reversed(files):
                if not path.is_file():
                    continue
                text = path.read_text(encoding="utf-8")
                try:
                    node = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
                except Exception:  # a broken file is reported by the composition itself
                    continue
                parsed.append((path, _package(text, group_package), node))
        return parsed

    def where(key: str) -> str:
        for override in overrides:
            name = override.lstrip("+~").split("=", 1)[0]
            if name == key or key.startswith(name + ".") or name.startswith(key + "."):
                return f" (command line: {override})"
        for path, package, node in read():
            relative = key[len(package) + 1 :] if package and key.startswith(package + ".") else key
            if (not package or key.startswith(package + ".")) and OmegaConf.select(node, relative) is not None:
                return f" (in {_shown(path)})"
        return ""

    return where


def _package(text: str, default: str) -> str:
    for line in text.splitlines():
        if line.startswith("# @package"):
            package = line.split(maxsplit=2)[2].strip()
            return "" if package == "_global_" else package
    return default


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def config_hash(conf: Mapping[str, Any]) -> str:
    """A stable hash of what a job computes: the Kedro section, params and metrics."""
    keyed = {k: conf.get(k) for k in ("kedro", "params", "metrics")}
    text = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hydra_error(err: BaseException) -> ConfigError:
    """One readable ``ConfigError`` from Hydra's or OmegaConf's exceptions."""
    text = str(err).strip().replace("'++", "'")
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text += "\n" + str(cause).strip()
    lines = [line for line in text.splitlines() if "HYDRA_FULL_ERROR" not in line]
    if "Config search path:" in lines:  # Hydra's search path says nothing to a kmrun user
        lines = lines[: lines.index("Config search path:")]
    if type(err).__name__.endswith("YAMLError") or "while parsing" in text or "while scanning" in text:
        lines = ["YAML syntax error:", *lines, "Fix the file at the line shown."]
    full_key = getattr(cause, "full_key", None) or getattr(err, "full_key", None)
    if "is not in struct" in text and full_key:
        from .schema import unknown_key

        lines = [unknown_key(str(full_key), source="on the command line")]
    if "Cannot find primary config" in text or "Primary config directory not found" in text:
        lines = [
            f"No {CONFIG_NAME}.yaml in {Path.cwd() / 'conf'}: run kmrun from a Kedro project "
            "that has conf/kmrun.yaml (kmrun init writes one), or point -cp at its config dir."
        ]
    return ConfigError("\n".join(lines))
