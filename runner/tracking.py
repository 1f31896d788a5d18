"""MLflow and Optuna stores: opening them, runs, batched params and metrics, tags,
artifacts, stale runs.

Everything goes through ``MlflowClient``, which keeps no hidden per-thread state, so
jobs never share an "active run". Every string kmrun sends has passed through a
``Redactor`` (``redact``) first.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
import socket
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from .errors import TrackingError
from .liveness import host_name, in_worker, owner_alive, process_tags
from .locks import RunLocks, creation_lock
from .patience import Patient
from .redact import Redactor, hide_password, url_password

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MAX_BATCH = 100  # params or tags per log_batch call
MAX_METRICS_BATCH = 1000


def default_store(cwd: Path | None = None) -> str:
    """The embedded store: ``mlflow.db`` in the working directory, as MLflow's own default."""
    return f"sqlite:///{((cwd or Path.cwd()) / 'mlflow.db').as_posix()}"


def resolve_uri(configured: str | None, base_dir: Path | None = None) -> str:
    """``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store
    (``mlflow.db`` in ``base_dir``, the working directory by default)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_store(base_dir)


# MLflow's rule for param and metric names (``mlflow.utils.validation``), kept here so that
# checking a grid's cells does not import MLflow; tests/test_tracking.py compares the two.
NAME = re.compile(r"^[/\w.\- :]*$" if os.name != "nt" else r"^[/\w.\- ]*$")


def rejected_names(names: Iterable[str]) -> list[str]:
    """The names MLflow would refuse for a param or a metric (and so a whole batch)."""
    return [n for n in names if not NAME.match(n) or _not_unique(n)]


def _not_unique(name: str) -> bool:
    """A name that is not its own normal path ("a//b", "./a", "a/"), which MLflow refuses."""
    norm = posixpath.normpath(name)
    return norm != name or norm == "." or norm.startswith(("..", "/"))


def name_rule() -> str:
    from mlflow.utils.validation import bad_character_message

    return bad_character_message()


def git_tags(path: Path) -> dict[str, str]:
    """``mlflow.source.git.commit`` and ``kmrun.git.dirty`` for the repo holding ``path``."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"kmrun.git": "not a git repository"}
    return {"mlflow.source.git.commit": commit, "kmrun.git.dirty": str(dirty).lower()}


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RunStore(Protocol):
    """What the job sources (grid, claims, study) ask of the MLflow store: the part of
    ``Tracker`` they use, so that a test's stand-in implements the same surface."""

    client: Any

    def start(self, run_name: str | None, tags: Mapping[str, str], parent_id: str | None = None) -> str: ...

    def claim(self, config_hash: str, run_name: str | None, tags: Mapping[str, str], parent_id: str,
              rerun: bool = False, fingerprint: str | None = None) -> tuple[str | None, Any]: ...

    def owner_alive(self, run: Any) -> bool: ...

    def release(self, run_id: str) -> None: ...

    def search(self, filter_string: str, max_results: int = 50_000) -> list[Any]: ...

    def fail_stale_runs(self) -> list[str]: ...

    def end_stale(self, run_id: str, with_parent: bool = False, trial_failed: bool = False) -> None: ...

    def finish(self, run_id: str, status: str) -> None: ...


class Tracker:
    """One MLflow store and experiment. Opening it checks that the store works, so a
    bad URI fails before any pipeline runs."""

    def __init__(self, uri: str, experiment_name: str) -> None:
        self.uri = uri
        self.experiment_name = experiment_name
        self._run_locks: RunLocks | None = None
        self._local_artifacts: dict[str, Path] = {}  # runs started here whose artifacts go to a local folder
        _quiet_store_logs()
        _check_reachable(uri)
        try:
            from mlflow import MlflowClient

            _http_retries_to_kmrun(uri)
            # a command opening its store fails at once if it never answers; a sweep's worker waits out an outage
            with creation_lock(uri, patient=in_worker()):  # several kmrun processes may create one store at once
                self.client: MlflowClient = MlflowClient(tracking_uri=uri)
                self.experiment_id = self._experiment(experiment_name)
            # a store that works now: from here on, each call waits out a brief outage (store_patience)
            self.client = Patient(self.client, hide_password(uri))  # type: ignore[assignment]
        except TrackingError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "locked" in first:
                first += " (another process holds it; try again when that process is done)"
            raise TrackingError(
                f"mlflow.tracking_uri: cannot open the MLflow store '{hide_password(uri)}': "
                f"{Redactor([url_password(uri)]).text(first)}{driver_hint(first)}\n"
                "Use sqlite:///PATH/mlflow.db, postgresql://USER@HOST/DB, http(s)://HOST:PORT of an MLflow server, or "
                "leave it null for the embedded store (mlflow.db in the working directory)."
            ) from None

    @property
    def _locks(self) -> RunLocks | None:
        if self.uri.split(":", 1)[0].split("+", 1)[0] not in ("postgresql", "postgres"):
            return None
        if self._run_locks is None:
            self._run_locks = RunLocks(self.uri)
        return self._run_locks

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"mlflow.experiment_name: experiment '{name}' is deleted in {hide_password(self.uri)}. "
                    f"Restore it (mlflow experiments restore) or pick another name."
                )
            self._warn_local_artifacts(found.artifact_location)
            return str(found.experiment_id)
        try:
            experiment_id = str(self.client.create_experiment(name, artifact_location=self._artifact_root(name)))
        except MlflowException as err:  # another process created it first (a server takes no creation lock)
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._experiment(name)
        self._warn_local_artifacts(self.client.get_experiment(experiment_id).artifact_location)
        return experiment_id

    def _warn_local_artifacts(self, location: str) -> None:
        """A store other machines share, with artifacts on this machine's disk: say so."""
        shared = not self.uri.startswith(("sqlite:", "file:")) and not self.uri.startswith(("http:", "https:"))
        if shared and (location.startswith("file:") or location.startswith("/") or "://" not in location):
            log.warning(
                "The MLflow store %s is shared, but this experiment's artifacts go to %s on this machine: other "
                "machines cannot read them (kmrun show, reproduce). Serve them with an MLflow server "
                "(mlflow server --artifacts-destination ...; mlflow.tracking_uri=http://...), or give the "
                "experiment a shared artifact location.", hide_password(self.uri), location)

    def _artifact_root(self, name: str) -> str | None:
        """Beside an SQLite file, artifacts go to ``mlartifacts/`` next to it."""
        parsed = urlparse(self.uri)
        if parsed.scheme != "sqlite" or self.uri.endswith(":memory:"):
            return None
        db = Path(self.uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", name)).resolve().as_uri()

    def start(self, run_name: str | None, tags: Mapping[str, str], parent_id: str | None = None) -> str:
        from urllib.request import url2pathname

        all_tags = {**process_tags(), **tags}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        where = urlparse(run.info.artifact_uri)
        if where.scheme == "file" and where.netloc in ("", "localhost"):
            if len(self._local_artifacts) > 10_000:
                self._local_artifacts.clear()
            self._local_artifacts[run.info.run_id] = Path(url2pathname(where.path))
        return str(run.info.run_id)

    def claim(self, config_hash: str, run_name: str | None, tags: Mapping[str, str], parent_id: str,
              rerun: bool = False, fingerprint: str | None = None) -> tuple[str | None, Any]:
        """Start the child run of a grid cell, unless another process has it: a FINISHED
        child of the same config hash, or a RUNNING one whose process lives. Checked and
        started under one lock (a file beside SQLite, an advisory lock in PostgreSQL), so
        that two grids started together run each cell once (with ``rerun``, only a RUNNING
        one counts). Returns the
        new run's id, or None and the run that has the cell."""
        with creation_lock(self.uri):
            found = self.search(
                f"tags.`kmrun.config_hash` = '{config_hash}' and tags.`kmrun.role` = 'child'", max_results=100)
            for run in found:
                if fingerprint is not None and run.data.tags.get("kmrun.fingerprint") != fingerprint:
                    continue
                if run.info.status == "FINISHED" and not rerun:
                    return None, run
                if run.info.status == "RUNNING":
                    if self.owner_alive(run):
                        return None, run
                    self.end_stale(run.info.run_id)
                    # its owner may have finished it (and let go of it) since the search read it RUNNING
                    run = self.client.get_run(run.info.run_id)
                    if run.info.status == "FINISHED" and not rerun:
                        return None, run
            run_id = self.start(run_name, {**tags, "kmrun.config_hash": config_hash}, parent_id)
            self.hold(run_id)
            return run_id, None

    def owner_alive(self, run: Any) -> bool:
        """Whether the process that owns a RUNNING run lives. On its own host, by its PID
        and start time. On another host, through PostgreSQL: the owner holds an advisory
        lock on the run for as long as it lives (PostgreSQL drops it with the owner's
        connection); other stores cannot tell, so the owner is taken to live."""
        if run.data.tags.get("kmrun.host") == host_name():
            return owner_alive(run.data.tags)
        return self._locks is None or not self._locks.free(run.info.run_id)

    def hold(self, run_id: str) -> None:
        """Say, for as long as this process lives, that it owns ``run_id`` (PostgreSQL only)."""
        if self._locks is not None:
            self._locks.hold(run_id)

    def release(self, run_id: str) -> None:
        if self._locks is not None:
            self._locks.release(run_id)

    def adopt(self, run_id: str) -> None:
        """Take over a run started for this job (``claim``): a worker process now owns it,
        so that its death, not the sweep's, marks the run stale."""
        if in_worker():
            self.log(run_id, tags=process_tags())

    def log(
        self,
        run_id: str,
        params: Mapping[str, str] = {},
        metrics: Mapping[str, float] = {},
        series: Mapping[str, list[float]] = {},
        tags: Mapping[str, str] = {},
    ) -> None:
        """Send params, metrics (``series`` as steps 0..n-1) and tags in as few calls as MLflow allows."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        metric_rows = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for key, values in series.items():
            metric_rows += [Metric(key, float(v), now, step) for step, v in enumerate(values)]
        param_rows = [Param(k, v) for k, v in params.items()]
        tag_rows = [RunTag(k, v) for k, v in tags.items()]
        while param_rows or metric_rows or tag_rows:
            self.client.log_batch(
                run_id,
                params=param_rows[:MAX_BATCH],
                metrics=metric_rows[:MAX_METRICS_BATCH],
                tags=tag_rows[:MAX_BATCH],
            )
            param_rows = param_rows[MAX_BATCH:]
            metric_rows = metric_rows[MAX_METRICS_BATCH:]
            tag_rows = tag_rows[MAX_BATCH:]

    def search(self, filter_string: str, max_results: int = 50_000) -> list[Any]:
        """Runs of this experiment matching an MLflow filter, newest first."""
        return list(
            self.client.search_runs(
                [self.experiment_id], filter_string, max_results=max_results, order_by=["attributes.start_time DESC"]
            )
        )

    def fail_stale_runs(self) -> list[str]:
        """Runs of this host left RUNNING by a process that no longer exists (killed
        with -9, or a crashed machine's reboot) are marked FAILED, tagged kmrun.stale."""
        stale = []
        host = host_name()
        for run in self.search(f"attributes.status = 'RUNNING' and tags.`kmrun.host` = '{host}'"):
            if not owner_alive(run.data.tags):
                self.client.set_tag(run.info.run_id, "kmrun.stale", "true")
                self.finish(run.info.run_id, "FAILED")
                stale.append(run.info.run_id)
        return stale

    def end_stale(self, run_id: str, with_parent: bool = False, trial_failed: bool = False) -> None:
        """The run of a job whose process died (on any host): FAILED, tagged kmrun.stale,
        unless it ended already; ``with_parent``: that process's parent run too.
        ``trial_failed``: the job's Optuna trial was failed, so even a FINISHED run is
        FAILED (its result never reached the study: the store went away before the tell)."""
        run = self.client.get_run(run_id)
        parent = run.data.tags.get("mlflow.parentRunId") if with_parent else None
        for orphan in filter(None, (run_id, parent)):
            status = self.client.get_run(orphan).info.status
            if status == "RUNNING" or (orphan == run_id and trial_failed and status == "FINISHED"):
                self.client.set_tag(orphan, "kmrun.stale", "true")
                self.finish(orphan, "FAILED")

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again, to add to it (a resumed sweep's parent)."""
        self.client.update_run(run_id, status="RUNNING")
        for key, value in process_tags().items():
            self.client.set_tag(run_id, key, value)

    def log_step(self, run_id: str, key: str, value: float, step: int) -> None:
        self.client.log_metric(run_id, key, value, step=step)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_texts(self, run_id: str, files: Mapping[str, str]) -> None:
        """Small text artifacts (name: text) of a run. A run this process started, whose
        artifacts go to a local folder, gets them written there as MLflow would write them,
        without asking the store where that folder is."""
        folder = self._local_artifacts.get(run_id)
        if folder is None:
            for name, text in files.items():
                self.log_text(run_id, text, name)
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")

    def finish(self, run_id: str, status: str) -> None:
        """End a run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status)

    def run_url(self, run_id: str) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An MLflow server that does not answer fails in seconds, not after MLflow's retries."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "localhost", port), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise TrackingError(
            f"mlflow.tracking_uri: cannot reach the MLflow server at '{hide_password(uri)}' "
            f"within {timeout:g} s: {err}\nStart the server (mlflow server --host HOST --port PORT), "
            "or leave mlflow.tracking_uri null for the embedded store (mlflow.db in the working directory)."
        ) from None


def _http_retries_to_kmrun(uri: str) -> None:
    """An MLflow server that stops answering: MLflow's client alone retries each call for
    about 4 minutes, silently. Keep its retries short (unless the user set them), so that
    kmrun's patience, which says it is waiting and has one documented bound, does the waiting."""
    if uri.startswith(("http:", "https:")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def ui_command(uri: str) -> str:
    """The command that opens MLflow's UI on this store (a password in the URI hidden)."""
    return f"mlflow ui --backend-store-uri {hide_password(uri)}" if not uri.startswith("http") else hide_password(uri)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _quiet_store_logs() -> None:
    for name in ("alembic", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # MLflow's retries: kmrun says it waits
    # it logs each database error with its traceback, then raises it: kmrun reports it (or waits it out)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def driver_hint(message: str) -> str:
    """What to install when SQLAlchemy lacks the database driver a URL names."""
    if "No module named 'psycopg'" in message:
        return (" (postgresql:// means psycopg 3 to SQLAlchemy 2: pip install 'kmrun[postgres]', or write "
                "postgresql+psycopg2://... to use an installed psycopg2)")
    if "No module named 'psycopg2'" in message:
        return " (pip install psycopg2-binary, or write postgresql+psycopg://... for psycopg 3)"
    if "No module named 'pymysql'" in message or "No module named 'MySQLdb'" in message:
        return " (pip install pymysql, and write mysql+pymysql://...)"
    return ""
