"""The ``kmrun`` command: subcommand words, or Hydra overrides for a run or a sweep.

The command parses, calls ``runner.run`` / ``runner.sweep`` or a subcommand, and turns
``KmrunError`` into one clear message and its exit code. No logic lives here.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import daemon
from .errors import KmrunError

USAGE = """\
usage: kmrun [-v] [OVERRIDE ...]            run one experiment
       kmrun -m [-v] [OVERRIDE ...]         run a sweep: a grid, or an Optuna study
       kmrun SUBCOMMAND [OPTIONS]           find, compare and reproduce runs

Subcommands (kmrun SUBCOMMAND --help for their options):
  runs        list runs: --filter "metrics.accuracy > 0.9" --sort KEY --format table|csv|md|json
  best        the best run by the objective, and how to reproduce it
  show        one run: params, metrics, tags, artifacts, config, reproduce command
  reproduce   rerun a run with its exact composed config and compare metrics
  promote     write a run's params to conf/experiment/NAME.yaml
  join        join a sweep started elsewhere (its parent run id): share its cells or trials
  register    register a run's model in MLflow's Model Registry (--name, --alias)
  models      registered models, their versions and aliases, and their runs' metric
  serve       serve a model over HTTP on 127.0.0.1: NAME, NAME/VERSION, NAME@ALIAS or a run
  ui          start MLflow's UI on the store (127.0.0.1)
  dashboard   start optuna-dashboard on the study storage
  init        add kmrun's config to the Kedro project in this directory
  cache       the node cache: size and entries; `clear` empties it; `explain RUN_ID`: hit or miss, and why
  daemon      the kept-alive process that runs commands with the libraries imported: status, stop

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
  -h, --help        this help, then the config groups of conf/
  --hydra-help      the Hydra flags kmrun takes (-cp, -cn, -cd, --cfg, --info, ...)

Exit codes: 0 success · 1 the pipeline failed · 2 bad input · 3 a bug in kmrun · 130 interrupted
"""

HYDRA_HELP = """\
Hydra flags kmrun takes:
  -cp, --config-path DIR     the config directory (default: ./conf)
  -cn, --config-name NAME    the primary config (default: kmrun, i.e. DIR/kmrun.yaml)
  -cd, --config-dir DIR      an extra config directory, searched too (for config groups)
  -c, --cfg job|hydra|all    print the composed config and exit; -p PACKAGE for one part,
                             --resolve to resolve interpolations
  -i, --info [all|config|defaults|defaults-tree|plugins|searchpath]
                             print Hydra's information about the composition and exit
  -m, --multirun             run a sweep (a grid, or an Optuna study)
Overrides: KEY=VALUE, +KEY=VALUE (add), ++KEY=VALUE (add or override), ~KEY (delete),
GROUP=OPTION; sweeps: a,b,c · range() · choice() · interval() · tag(log, ...).
"""

VALUE_FLAGS = {"-cp": "config_path", "--config-path": "config_path", "-cn": "config_name",
               "--config-name": "config_name", "-cd": "config_dir", "--config-dir": "config_dir",
               "-c": "cfg", "--cfg": "cfg", "-p": "package", "--package": "package"}
SWITCHES = {"-v": "verbose", "--verbose": "verbose", "-m": "multirun", "--multirun": "multirun",
            "-h": "help", "--help": "help", "--hydra-help": "hydra_help", "--resolve": "resolve"}
INFO = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


@dataclass
class Args:
    """A run or sweep command line: Hydra's flags, and the overrides."""

    overrides: list[str] = field(default_factory=list)
    verbose: bool = False
    multirun: bool = False
    help: bool = False
    hydra_help: bool = False
    resolve: bool = False
    config_path: str | None = None
    config_name: str = "kmrun"
    config_dir: str | None = None
    cfg: str | None = None
    package: str | None = None
    info: str | None = None


KEDRO_FLAGS = ("--params", "--pipeline", "--env", "-e", "--tags", "-t", "--nodes", "-n")


def kedro_flag(flag: str, value: str) -> str:
    """`kedro run`'s flags, said in kmrun's syntax."""
    if flag == "--params":
        pairs = [p.split("=", 1) if "=" in p else p.split(":", 1) for p in value.split(",") if p]
        said = " ".join(f"params.{k.strip()}={v.strip()}" for k, v in (p for p in pairs if len(p) == 2))
    elif flag == "--pipeline":
        said = f"kedro.pipeline={value or 'NAME'}"
    elif flag in ("--env", "-e"):
        said = f"kedro.env={value or 'ENV'}"
    elif flag in ("--tags", "-t"):
        said = f"kedro.tags=[{value or 'TAG'}]"
    else:
        said = "kedro.tags=[...] (kmrun runs whole pipelines or tagged nodes, not single nodes)"
    return (f"{flag} is `kedro run`'s flag; kmrun takes Hydra overrides. Write: kmrun {said or 'params.KEY=VALUE'}"
            " (params.* values are checked against the project's parameters).")


def parse_args(argv: list[str]) -> Args:
    """Flags anywhere, overrides in order; a flag kmrun does not know is bad input."""
    args = Args()
    items = iter(range(len(argv)))
    for i in items:
        arg = argv[i]
        flag, _, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if flag in VALUE_FLAGS:
            value = inline or (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                raise KmrunError(f"{flag} needs a value. See kmrun --hydra-help.")
            if not inline:
                next(items)
            setattr(args, VALUE_FLAGS[flag], value)
        elif arg in SWITCHES:
            setattr(args, SWITCHES[arg], True)
        elif flag in ("-i", "--info"):
            args.info = inline or "all"
            if not inline and i + 1 < len(argv) and argv[i + 1] in INFO:
                args.info = argv[i + 1]
                next(items)
        elif flag in KEDRO_FLAGS:
            raise KmrunError(kedro_flag(flag, inline or (argv[i + 1] if i + 1 < len(argv) else "")))
        elif arg.startswith("-"):
            raise KmrunError(
                f"Unknown option '{arg}'. kmrun takes overrides (params.model.C=0.5), -m, -v and "
                "Hydra's -cp/-cn/-cd/--cfg/--info (kmrun --help)."
            )
        else:
            args.overrides.append(arg)
    if args.cfg is not None and args.cfg not in ("job", "hydra", "all"):
        raise KmrunError(f"--cfg {args.cfg}: use job, hydra or all.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        os.getcwd()
    except FileNotFoundError:
        print("Error: the working directory no longer exists (it was deleted, or replaced by a new folder of the "
              "same name). cd into the folder that holds conf/ (cd \"$PWD\" enters the new one) and run the "
              "command again.", file=sys.stderr)
        return 2
    if args[:1] == ["daemon"]:
        return daemon.command(args[1:])
    if daemon.wanted():  # a kept-alive process with the libraries imported runs it, if one serves us
        code = daemon.forward(args)
        if code is not None:
            return code
    if args and args[0] in SUBCOMMANDS:
        return subcommand(args)
    if args and "=" not in args[0] and not args[0].startswith(("-", "+", "~")):
        from . import terminal

        terminal.error(f"Unknown subcommand '{args[0]}'. Subcommands: {', '.join(SUBCOMMANDS)}; "
                       "overrides hold '=' (params.model.C=0.5) or start with + or ~.")
        return 2
    verbose = any(a in ("-v", "--verbose") for a in args) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    with _signals():
        return _guarded(lambda: _command(parse_args(args)), verbose)


def _command(args: Args) -> int:
    from . import api, terminal

    if args.help:
        print(USAGE)
        return _groups(args)
    if args.hydra_help:
        print(HYDRA_HELP)
        return 0
    if args.cfg or args.info:
        return _show(args)
    terminal.setup_logging(args.verbose)
    where = _config_dir(args), args.config_name, args.config_dir
    if args.multirun:
        return api.sweep(args.overrides, echo=True, verbose=args.verbose, config_dir=where[0], config_name=where[1],
                         search_dir=where[2]).exit_code
    try:
        api.run(args.overrides, echo=True, verbose=args.verbose, config_dir=where[0], config_name=where[1],
                search_dir=where[2])
    except KeyboardInterrupt:
        terminal.error("Interrupted: the run is marked KILLED.")
        raise
    return 0


def _guarded(command: Any, verbose: bool) -> int:
    """Run ``command``; its ``KmrunError`` becomes a message and an exit code, anything
    else a kmrun bug with its traceback."""
    from . import terminal

    try:
        return int(command())
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kmrun ... | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KmrunError as err:
        if verbose or err.exit_code == 3:
            traceback.print_exc()
        terminal.error(str(err))
        return err.exit_code
    except Exception as err:
        traceback.print_exc()
        terminal.error(f"kmrun bug: {type(err).__name__}: {err}\nThis is an error in kmrun, not in your "
                       "pipeline or config. Please report it with the traceback above.")
        return 3


def _config_dir(args: Args) -> Path | None:
    return _path(args.config_path)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _groups(args: Args) -> int:
    """Hydra's --help part: the config groups kmrun can compose from."""
    from .compose import Composer

    try:
        with Composer(_config_dir(args), args.config_name) as composer:
            groups = composer.groups()
    except KmrunError:
        return 0  # no config here: the usage is all there is to show
    if groups:
        print("Config groups of " + str(composer.config_dir) + " (select with GROUP=OPTION, or +GROUP=OPTION):")
        for group, options in groups.items():
            print(f"  {group}: {', '.join(options)}")
    return 0


def _show(args: Args) -> int:
    """--cfg and --info: what Hydra composes, printed; nothing runs."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from .compose import Composer

    with Composer(_config_dir(args), args.config_name, _path(args.config_dir)) as composer:
        cfg = composer.compose(args.overrides)
        if args.info:  # Hydra prints it through a DEBUG logger it sets up on the root: put that back after
            import logging

            handlers, level = logging.root.handlers[:], logging.root.level
            try:
                GlobalHydra.instance().hydra.show_info(args.info, args.config_name, args.overrides)  # type: ignore[union-attr]
            finally:
                logging.root.handlers[:], logging.root.level = handlers, level
            return 0
    if args.cfg == "hydra":
        cfg = cfg.hydra
    elif args.cfg == "job":
        with open_dict(cfg):
            del cfg["hydra"]
    if args.package:
        cfg = OmegaConf.select(cfg, args.package)
        if cfg is None:
            raise KmrunError(f"-p {args.package}: no such package in the composed config.")
    print(OmegaConf.to_yaml(cfg, resolve=args.resolve) if OmegaConf.is_config(cfg) else cfg)
    return 0


class _signals:
    """For the command's lifetime: SIGTERM and SIGHUP end runs KILLED like Ctrl-C; a second
    signal leaves at once. The handlers found are put back afterwards."""

    def __init__(self) -> None:
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> None:
        self.saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal sends SIGHUP
            if self.saved[sig] is not signal.SIG_IGN:  # nohup: stay running
                signal.signal(sig, _interrupt)
        if self.saved[signal.SIGINT] is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupt)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    """First Ctrl-C (or SIGTERM): unwind, marking runs KILLED. A second one: leave now;
    the next kmrun marks anything left RUNNING as FAILED."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _leave_now)
    raise KeyboardInterrupt


def _leave_now(signum: int, frame: object) -> None:
    os.write(2, b"\nInterrupted again: exiting now. The next kmrun marks runs left RUNNING as FAILED.\n")
    os._exit(130)


SUBCOMMANDS = ("runs", "best", "show", "reproduce", "promote", "join", "register", "models", "serve", "ui", "dashboard",
               "init", "cache")


def subcommand(args: list[str]) -> int:
    """Parse a subcommand's options, run it, and turn ``KmrunError`` into exit 2."""
    import argparse

    parser = argparse.ArgumentParser(prog="kmrun", description="kmrun subcommands; see kmrun --help.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, store: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if store:
            p.add_argument("--tracking-uri",
                           help="the MLflow store (default: conf/kmrun.yaml, $MLFLOW_TRACKING_URI, ./mlflow.db)")
            p.add_argument("-cp", "--config-dir", help="kmrun's config dir (default: ./conf)")
        p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
        return p

    p = command("runs", "List runs, children grouped under their sweep or study.")
    p.add_argument("--experiment", help="experiment name (default: the configured one, else all)")
    p.add_argument("--filter", help='MLflow search syntax, e.g. "metrics.accuracy > 0.9"')
    p.add_argument("--sort", help="KEY [ASC|DESC], e.g. metrics.accuracy (metrics sort DESC by default)")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    p.add_argument("--format", choices=("table", "csv", "md", "json"), default="table")
    p.add_argument("--only-changed", action="store_true", help="only the params that differ across the rows "
                   "(always so in the table)")
    p.add_argument("--columns", help="the table's columns, e.g. name,status,objective,metrics.f1_macro,params.model.C")
    p = command("best", "The best FINISHED run by the objective.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--sweep", metavar="PARENT_RUN_ID", help="only the children of this sweep or study")
    scope.add_argument("--experiment", help="experiment name")
    p.add_argument("--metric", help="default: objective.metric of conf/kmrun.yaml")
    p.add_argument("--direction", choices=("minimize", "maximize"))
    p.add_argument("--env", help="only runs of this Kedro env")
    p.add_argument("--current", action="store_true",
                   help="only runs of the current code, Kedro config, data and environment (loads the project)")
    p = command("show", "Show one run.")
    p.add_argument("run_id", help="a run id or a unique prefix of one")
    p = command("reproduce", "Rerun a run with its exact composed config; compare metrics.")
    p.add_argument("run_id")
    p.add_argument("--strict", action="store_true", help="refuse when the git commit differs or the tree is dirty")
    p = command("promote", "Write a run's params as conf/experiment/NAME.yaml.")
    p.add_argument("run_id")
    p.add_argument("--name", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p = command("join", "Join a sweep started elsewhere: run its recorded command here, sharing its jobs.")
    p.add_argument("run_id", help="the sweep's parent run id (or a unique prefix)")
    p = command("register", "Register a run's model in MLflow's Model Registry.")
    p.add_argument("run_id", help="a run id (or a unique prefix) whose run logged a model")
    p.add_argument("--name", required=True, help="the registered model's name")
    p.add_argument("--alias", help="also point this alias (e.g. champion) at the new version")
    p = command("models", "List registered models, their versions and aliases, and their runs' metrics.")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p = command("serve", "Serve a model over HTTP (MLflow's scoring server): POST /invocations.")
    p.add_argument("model", help="NAME (latest version), NAME/VERSION, NAME@ALIAS, or a run id (prefix)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: this machine only")
    p.add_argument("--port", type=int, default=5001)
    for name, port in (("ui", 5000), ("dashboard", 8080)):
        about = "Start MLflow's UI on the store." if name == "ui" else "Start optuna-dashboard on the study storage."
        p = command(name, about)
        p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: this machine only")
        p.add_argument("--port", type=int, default=port)
        if name == "dashboard":
            p.add_argument("--storage", help="default: optuna.db beside the MLflow store")
    p = command("init", "Write conf/kmrun.yaml, conf/experiment/baseline.yaml and an example study.", store=False)
    p.add_argument("--no-run", action="store_true", help="do not run the pipeline once to find its metrics")
    p.add_argument("--kedro-mlflow", action="store_true",
                   help="with kedro-mlflow installed: write conf/local/mlflow.yml pointing it at kmrun's store")
    p = command("cache", "The node cache: its size and entries; `kmrun cache clear` empties it; "
                         "`kmrun cache explain RUN_ID` says, node by node, what a run took from it and why not.")
    p.add_argument("action", nargs="?", choices=("show", "clear", "explain"), default="show")
    p.add_argument("run_id", nargs="?", help="with explain: a run id or a unique prefix of one")

    try:
        options = parser.parse_args(args)
    except SystemExit as done:
        return 0 if done.code in (0, None) else 2
    return _guarded(lambda: _subcommand(options), options.verbose)


def _subcommand(options: Any) -> int:
    from . import terminal

    if options.command == "init":
        from .scaffold import init

        with terminal.quiet_unless(options.verbose):
            written, notes = init(Path.cwd(), run=not options.no_run, kedro_mlflow=options.kedro_mlflow)
        terminal.say(
            "wrote " + ", ".join(str(p.relative_to(Path.cwd())) for p in written) + "\n"
            + "".join(f"  {note}\n" for note in notes) + "next:\n"
            "  kmrun +experiment=baseline\n  kmrun -m +experiment=baseline params.KEY=a,b\n  kmrun runs"
        )
        return 0
    from . import commands

    if options.command == "join":  # the sweep's own command, run as if typed here
        return main(commands.join(options))
    if options.command in ("register", "models", "serve", "ui", "dashboard"):
        from . import registry

        return int(getattr(registry, options.command)(options))
    return int(getattr(commands, options.command)(options))


if __name__ == "__main__":
    sys.exit(main())
