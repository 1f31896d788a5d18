"""The ``kmrun`` command: subcommand words, or Hydra overrides for a run or a sweep.

The command parses, calls into the package, and turns ``KmrunError`` into one clear
message and exit code 2. No logic lives here.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import TYPE_CHECKING, Any

from .errors import JobFailed, KmrunError

if TYPE_CHECKING:
    from collections.abc import Callable

    from omegaconf import DictConfig

    from .job import JobResult
    from .sweep import SweepOutcome

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
  ui          start MLflow's UI on the store (127.0.0.1)
  dashboard   start optuna-dashboard on the study storage
  init        add kmrun's config to the Kedro project in this directory

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
    if args and args[0] in SUBCOMMANDS:
        return subcommand(args)
    if args and "=" not in args[0] and not args[0].startswith(("-", "+", "~")):
        from . import terminal

        terminal.error(f"Unknown subcommand '{args[0]}'. Subcommands: {', '.join(SUBCOMMANDS)}; "
                       "overrides hold '=' (params.model.C=0.5) or start with + or ~.")
        return 2
    verbose = any(a in VERBOSE_FLAGS for a in args)
    args = [a for a in args if a not in VERBOSE_FLAGS]
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return _hydra_help(args)
    from . import terminal

    multirun = any(a in ("-m", "--multirun") for a in args)
    signal.signal(signal.SIGTERM, _interrupt)  # end runs KILLED, as on Ctrl-C
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
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


SUBCOMMANDS = ("runs", "best", "show", "reproduce", "promote", "ui", "dashboard", "init")


def subcommand(args: list[str]) -> int:
    """Parse a subcommand's options, run it, and turn ``KmrunError`` into exit 2."""
    import argparse

    from . import terminal

    parser = argparse.ArgumentParser(prog="kmrun", description="kmrun subcommands; see kmrun --help.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, store: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if store:
            p.add_argument("--tracking-uri", help="the MLflow store (default: conf/kmrun.yaml, $MLFLOW_TRACKING_URI, ./mlflow.db)")
            p.add_argument("-cp", "--config-dir", help="kmrun's config dir (default: ./conf)")
        p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
        return p

    p = command("runs", "List runs, children grouped under their sweep or study.")
    p.add_argument("--experiment", help="experiment name (default: the configured one, else all)")
    p.add_argument("--filter", help='MLflow search syntax, e.g. "metrics.accuracy > 0.9"')
    p.add_argument("--sort", help="KEY [ASC|DESC], e.g. metrics.accuracy (metrics sort DESC by default)")
    p.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    p.add_argument("--format", choices=("table", "csv", "md", "json"), default="table")
    p.add_argument("--only-changed", action="store_true", help="only the params that differ across the rows")
    p = command("best", "The best FINISHED run by the objective.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--sweep", metavar="PARENT_RUN_ID", help="only the children of this sweep or study")
    scope.add_argument("--experiment", help="experiment name")
    p.add_argument("--metric", help="default: objective.metric of conf/kmrun.yaml")
    p.add_argument("--direction", choices=("minimize", "maximize"))
    p = command("show", "Show one run.")
    p.add_argument("run_id", help="a run id or a unique prefix of one")
    p = command("reproduce", "Rerun a run with its exact composed config; compare metrics.")
    p.add_argument("run_id")
    p.add_argument("--strict", action="store_true", help="refuse when the git commit differs or the tree is dirty")
    p = command("promote", "Write a run's params as conf/experiment/NAME.yaml.")
    p.add_argument("run_id")
    p.add_argument("--name", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    for name, port in (("ui", 5000), ("dashboard", 8080)):
        p = command(name, "Start MLflow's UI on the store." if name == "ui" else "Start optuna-dashboard on the study storage.")
        p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: this machine only")
        p.add_argument("--port", type=int, default=port)
        if name == "dashboard":
            p.add_argument("--storage", help="default: optuna.db beside the MLflow store")
    command("init", "Write conf/kmrun.yaml, conf/experiment/baseline.yaml and an example study.", store=False)

    try:
        options = parser.parse_args(args)
    except SystemExit as done:
        return 0 if done.code in (0, None) else 2
    try:
        if options.command == "init":
            from pathlib import Path

            from .scaffold import init

            with terminal.quiet_unless(options.verbose):
                written = init(Path.cwd())
            terminal.say(
                "wrote " + ", ".join(str(p.relative_to(Path.cwd())) for p in written) + "\nnext:\n"
                "  kmrun +experiment=baseline\n  kmrun -m +experiment=baseline params.KEY=a,b\n  kmrun runs"
            )
            return 0
        from . import commands

        return int(getattr(commands, options.command)(options))
    except KmrunError as err:
        if options.verbose:
            traceback.print_exc()
        terminal.error(str(err))
        return err.exit_code


def run_once(args: list[str], verbose: bool = False) -> JobResult:
    """Compose, check and run one job; print its summary. The API behind ``runner.run``."""
    from . import compose, job, terminal

    def task(cfg: DictConfig) -> JobResult:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        loud = verbose or bool(cfg.get("verbose", False))
        terminal.setup_logging(loud)
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

    return _launch(args, task)  # type: ignore[no-any-return]


def run_many(args: list[str], verbose: bool = False) -> SweepOutcome:
    """Run a sweep through Hydra's multirun and kmrun's sweeper; return its outcome."""
    from . import sweep, terminal

    terminal.VERBOSE = verbose
    terminal.setup_logging(verbose)
    with terminal.quiet_unless(verbose):
        _launch(args, lambda cfg: None)
    if not sweep.outcomes:
        raise KmrunError("-m ran no sweep: is `override hydra/sweeper: kmrun` in conf/kmrun.yaml's defaults?")
    return sweep.outcomes[-1]


def _interrupt(signum: int, frame: object) -> None:
    """First Ctrl-C (or SIGTERM): unwind, marking runs KILLED. A second one: leave now;
    the next kmrun marks anything left RUNNING as FAILED."""
    signal.signal(signal.SIGINT, _leave_now)
    signal.signal(signal.SIGTERM, _leave_now)
    raise KeyboardInterrupt


def _leave_now(signum: int, frame: object) -> None:
    os.write(2, b"\nInterrupted again: exiting now. The next kmrun marks runs left RUNNING as FAILED.\n")
    os._exit(130)


def _launch(args: list[str], task: Callable[[DictConfig], Any]) -> Any:
    """Hydra with ``task``; its config errors become one ``ConfigError``."""
    from . import compose

    try:
        return compose.launch(args, task)
    except (KmrunError, JobFailed, KeyboardInterrupt):
        raise
    except Exception as err:
        if _is_config_error(err):
            raise compose.hydra_error(err) from err
        raise


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
