"""Shared fixtures: a template MLflow store, a project copy in a temp dir, the CLI."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["KEDRO_DISABLE_TELEMETRY"] = "true"
os.environ["KMRUN_DAEMON"] = "0"  # the tests that want the daemon turn it on (tests/test_daemon.py)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started as a shell's background job: what we start
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (Ray's nodes, kmrun) gets Ctrl-C as from a terminal
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite store, made once (migrations cost seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@dataclass
class Done:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class Workspace:
    """A temp dir holding a copy of conf/ and the example project, and a fresh store."""

    path: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.path / 'mlflow.db'}"

    def kmrun(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Done:
        full_env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "COLUMNS": "200", **(env or {})}
        done = subprocess.run(
            [sys.executable, "-m", "runner.cli", *args],
            cwd=self.path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Done(done.returncode, done.stdout, done.stderr)

    def client(self, uri: str | None = None):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=uri or self.uri)

    def runs(self, uri: str | None = None) -> list:
        client = self.client(uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(ids, max_results=1000) if ids else []

    def family(self, kind: str = "child") -> tuple[list, list]:
        """The parent runs, and the runs tagged kmrun.role=child (or kmrun.kind=trial)."""
        runs = self.runs()
        return [r for r in runs if r.data.tags.get("kmrun.role") == "parent"], child_runs(runs, kind)

    def running(self, uri: str | None = None) -> int:
        db = Path((uri or self.uri).removeprefix("sqlite:///"))
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(db) as con:
                return con.execute("select count(*) from runs where status='RUNNING'").fetchone()[0]
        except sqlite3.DatabaseError as err:
            if "not a database" in str(err):  # a test damaged it on purpose: it holds no run at all
                return 0
            raise


def child_runs(runs: list, kind: str = "child") -> list:
    """The runs tagged kmrun.role=child (or, with kind="trial", kmrun.kind=trial)."""
    key = "kmrun.kind" if kind == "trial" else "kmrun.role"
    return [r for r in runs if r.data.tags.get(key) == kind]


def eventually(check, seconds: float = 30, every: float = 0.2) -> bool:
    """Poll ``check()`` until it is true (True) or ``seconds`` pass (False)."""
    deadline = time.time() + seconds
    while not check():
        if time.time() > deadline:
            return False
        time.sleep(every)
    return True


def group_gone(pgid: int, seconds: float = 15) -> bool:
    """Whether no process of the process group ``pgid`` is left within ``seconds``."""
    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False
    return eventually(gone, seconds)


def free_port() -> int:
    """A TCP port nothing listens on, on 127.0.0.1 (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, seconds: float = 120, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``url`` until it answers 200 (True), ``seconds`` pass or ``proc`` exits (False)."""
    deadline = time.time() + seconds
    while time.time() < deadline and (proc is None or proc.poll() is None):
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200:
                return True
        except OSError:
            time.sleep(0.5)
    return False


def start_server(command: list[str], home: Path, health: str) -> subprocess.Popen:
    """A server in its own process group, its output in ``home/server.log``, once ``health``
    answers (else the test fails with the log's end)."""
    with open(home / "server.log", "a") as log:
        proc = subprocess.Popen(command, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if not answers(health, proc=proc):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the server did not start: " + (home / "server.log").read_text()[-2000:])
    return proc


def mlflow_command(backend: str, home: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
            str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


@contextmanager
def mlflow_server(home: Path, backend: str):
    """A real ``mlflow server`` on 127.0.0.1 over ``backend``, serving artifacts kept in
    ``home/artifacts``; yields its URL, and stops it (its whole process group) after."""
    port = free_port()
    proc = start_server(mlflow_command(backend, home, port), home, f"http://127.0.0.1:{port}/health")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def make_workspace(tmp_path: Path, template_store: Path) -> Workspace:
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copytree(
        ROOT / "examples" / "digits",
        tmp_path / "examples" / "digits",
        ignore=shutil.ignore_patterns("*.pkl", "*.json", "sessions", "__pycache__"),
    )
    shutil.copy(template_store, tmp_path / "mlflow.db")
    return Workspace(tmp_path)


@pytest.fixture
def ws(tmp_path: Path, template_store: Path) -> Workspace:
    return make_workspace(tmp_path, template_store)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The fast tier starts no process (the README says so): a test that does is marked slow."""
    if request.node.get_closest_marker("slow") is None:
        platform.processor()  # the standard library asks `uname -p` once (MLflow's import does): not the test's

        def refuse(*args, **kwargs):
            raise AssertionError("a fast-tier test started a process: mark it @pytest.mark.slow")

        monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
        monkeypatch.setattr(os, "fork", refuse)
    yield


@pytest.fixture(autouse=True)
def _clean_globals(monkeypatch: pytest.MonkeyPatch):
    """Reset what tests may leave behind: cwd, Hydra's singleton, MLflow's active run."""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run():
            mlflow.end_run()


@pytest.fixture
def libraries(tmp_path):
    """The mutation project's libraries (tests/mutation_project.py): a wheel in two versions, one
    installed, and a library installed editable from a folder outside the project."""
    from kedro_projects import editable, pip, wheel

    versions = {v: wheel(tmp_path, "kmrun_tinylib", v, f"FACTOR = {float(v)}\n") for v in ("1.0", "2.0")}
    pip("install", "--no-deps", "--no-index", str(versions["1.0"]))
    source, installed = editable(tmp_path / "edlib", "kmrun_edlib", "def factor():\n    return 1.5\n")
    yield versions, source
    pip("uninstall", "-y", "kmrun_tinylib")
    for path in installed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
