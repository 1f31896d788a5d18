"""The daemon (``runner/daemon.py``): real zygote processes, real signals. Each test has its
own socket folder (``XDG_RUNTIME_DIR``) and stops its zygotes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import eventually, group_gone

slow = pytest.mark.slow


@pytest.fixture
def daemon_env(tmp_path):
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"KMRUN_DAEMON": "1", "XDG_RUNTIME_DIR": str(runtime), "KMRUN_DAEMON_IDLE": "120"}
    yield env
    subprocess.run([sys.executable, "-m", "runner.cli", "daemon", "stop"], env={**os.environ, **env},
                   capture_output=True, timeout=60)


def zygotes(ws, env) -> list[str]:
    out = ws.kmrun("daemon", "status", env=env).out
    return [line.split()[1] for line in out.splitlines() if line.strip().startswith("pid ")]


def started(ws, env) -> str:
    assert eventually(lambda: len(zygotes(ws, env)) == 1, 120), "no daemon started"
    return zygotes(ws, env)[0]


@slow
def test_a_command_through_the_daemon_gives_what_it_gives_without_and_sees_edited_code(ws, daemon_env):
    first = ws.kmrun("+experiment=baseline", env=daemon_env)  # no daemon yet: runs here, and starts one
    assert first.code == 0, first.err
    pid = started(ws, daemon_env)
    through = ws.kmrun("+experiment=baseline", "params.model.C=0.5", "mlflow.experiment_name=d", env=daemon_env)
    alone = ws.kmrun("+experiment=baseline", "params.model.C=0.5", "mlflow.experiment_name=a")
    assert through.code == alone.code == 0, through.err
    runs = {r.data.tags["mlflow.runName"] + r.info.experiment_id: r for r in ws.runs()}
    by_experiment = {ws.client().get_experiment(r.info.experiment_id).name: r for r in runs.values()}
    daemon_run, plain_run = by_experiment["d"], by_experiment["a"]
    assert daemon_run.data.metrics == plain_run.data.metrics  # the same numbers
    assert daemon_run.data.params == plain_run.data.params
    assert json.loads(ws.kmrun("runs", "--format", "json", env=daemon_env).out) == json.loads(
        ws.kmrun("runs", "--format", "json").out)
    bad = ws.kmrun("+experiment=baseline", "params.model.Cx=1", env=daemon_env)
    assert bad.code == 2 and "params.model.Cx" in bad.err and "Traceback" not in bad.err, bad.err
    # the project's code is imported after the fork: an edit is seen by the next command
    nodes = ws.path / "examples/digits/src/digits/pipelines/train/nodes.py"
    nodes.write_text(nodes.read_text().replace("/ 16.0", "/ 16.0 > 0.5"))  # binarised pixels: other numbers
    edited = ws.kmrun("+experiment=baseline", "params.model.C=0.5", "mlflow.experiment_name=d2", env=daemon_env)
    plain = ws.kmrun("+experiment=baseline", "params.model.C=0.5", "mlflow.experiment_name=a2")
    assert edited.code == plain.code == 0, edited.err
    named = {ws.client().get_experiment(r.info.experiment_id).name: r for r in ws.runs()}
    assert named["d2"].data.metrics == named["a2"].data.metrics != plain_run.data.metrics
    assert zygotes(ws, daemon_env) == [pid]  # all of it through one zygote
    assert named["d2"].data.tags["kmrun.pid"] != str(pid)  # a fresh child ran it, not the zygote


@slow
def test_a_killed_daemon_is_replaced_and_a_killed_client_takes_its_command_along(ws, daemon_env):
    ws.kmrun("cache", env=daemon_env)
    old = started(ws, daemon_env)
    os.kill(int(old), signal.SIGKILL)
    again = ws.kmrun("cache", env=daemon_env)
    assert again.code == 0, again.err  # runs without it, and starts a new one
    new = started(ws, daemon_env)
    assert new != old
    client = subprocess.Popen([sys.executable, "-m", "runner.cli", "-m", "+experiment=forest",
                               "params.model.n_estimators=3000,3300", "cache=false"], cwd=ws.path,
                              env={**os.environ, **daemon_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert eventually(lambda: ws.running() >= 1, 120), "the command did not start a run"
    child = int(next(r.data.tags["kmrun.pid"] for r in ws.runs() if r.info.status == "RUNNING"))
    assert child != client.pid
    client.kill()  # kill -9 of the command the user started
    client.wait()
    assert group_gone(os.getpgid(child) if _alive(child) else child, 30), "the command outlived its client"
    assert zygotes(ws, daemon_env) == [new]  # the zygote itself lives on


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@slow
def test_ctrl_c_reaches_the_command_which_ends_its_run_killed(ws, daemon_env):
    """The zygote is started by a command whose Ctrl-C is ignored (as a shell's background
    job's is): the next command, whose Ctrl-C is not, still gets it."""
    subprocess.run([sys.executable, "-m", "runner.cli", "cache"], cwd=ws.path, env={**os.environ, **daemon_env},
                   capture_output=True, timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    started(ws, daemon_env)
    client = subprocess.Popen([sys.executable, "-m", "runner.cli", "+experiment=forest",
                               "params.model.n_estimators=4000", "cache=false"], cwd=ws.path,
                              env={**os.environ, **daemon_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert eventually(lambda: ws.running() == 1, 120)
    client.send_signal(signal.SIGINT)
    out = client.communicate(timeout=60)[0]
    assert client.returncode == 130, out[-2000:]
    assert [r.info.status for r in ws.runs()] == ["KILLED"]


@slow
def test_a_socket_folder_others_can_enter_is_not_used(ws, daemon_env, tmp_path):
    from runner.daemon import _ask

    ws.kmrun("cache", env=daemon_env)
    started(ws, daemon_env)
    sockets = list((tmp_path / "runtime").glob("kmrun-*/*.sock"))
    assert len(sockets) == 1 and sockets[0].stat().st_mode & 0o777 == 0o600
    before = _ask(sockets[0], "status")
    assert ws.kmrun("cache", env=daemon_env).code == 0
    served = _ask(sockets[0], "status")["last"]
    assert served > before["last"]  # that command was served by the zygote
    folder = sockets[0].parent
    folder.chmod(0o777)  # anyone may now plant a socket here: kmrun stops using it
    try:
        assert ws.kmrun("cache", env=daemon_env).code == 0
        assert _ask(sockets[0], "status")["last"] == served  # this one ran without it
        assert "is not a folder only you can enter" in ws.kmrun("daemon", "status", env=daemon_env).out
    finally:
        folder.chmod(0o700)


PROBE = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    sys.exit(7)
request = {"argv": ["cache"], "cwd": "/", "env": {}, "umask": 18, "path": []}
try:  # a refusal closes the connection: as soon as it is made, or once the request is in
    socket.send_fds(s, [json.dumps(request).encode() + b"\\n"], [0, 1, 2])
    answer = s.makefile("rb").readline()
except (BrokenPipeError, ConnectionResetError):
    answer = b""
print("served" if answer else "refused")
"""


@slow
@pytest.mark.skipif(os.getuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root (to be another user) and /usr/bin/python3")
def test_another_user_can_neither_reach_the_socket_nor_be_served(ws, daemon_env):
    import shutil
    import tempfile

    runtime = tempfile.mkdtemp(dir="/tmp")  # a path others may walk to, unlike pytest's tmp_path
    os.chmod(runtime, 0o755)
    daemon_env["XDG_RUNTIME_DIR"] = runtime
    try:
        _refuses_others(ws, daemon_env, runtime)
    finally:
        ws.kmrun("daemon", "stop", env=daemon_env)
        shutil.rmtree(runtime, ignore_errors=True)


def _refuses_others(ws, daemon_env, runtime):
    from pathlib import Path

    ws.kmrun("cache", env=daemon_env)
    started(ws, daemon_env)
    sock = next(Path(runtime).glob("kmrun-*/*.sock"))

    def as_nobody():
        return subprocess.run(["/usr/bin/python3", "-c", PROBE, str(sock)], user=65534, group=65534,
                              capture_output=True, text=True, timeout=60)

    assert as_nobody().returncode == 7  # the folder (0700) and the socket (0600) keep others out
    sock.parent.chmod(0o711)
    sock.chmod(0o666)  # as if the modes were lost: the zygote still asks who is calling
    try:
        other = as_nobody()
        assert other.returncode == 0 and other.stdout.strip() == "refused", (other.stdout, other.stderr)
    finally:
        sock.parent.chmod(0o700)
        sock.chmod(0o600)


@slow
def test_daemon_stop_stops_every_zygote(ws, daemon_env):
    ws.kmrun("cache", env=daemon_env)
    pid = int(started(ws, daemon_env))
    done = ws.kmrun("daemon", "stop", env=daemon_env)
    assert done.code == 0 and "stopped 1" in done.out
    assert eventually(lambda: not _alive(pid) or _zombie(pid), 30)
    assert zygotes(ws, daemon_env) == []


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_when_the_daemon_is_used_and_what_asks_for_another(monkeypatch, tmp_path):
    from runner import daemon

    monkeypatch.setenv("KMRUN_DAEMON", "0")
    assert not daemon.wanted()
    monkeypatch.setenv("KMRUN_DAEMON", "1")
    assert daemon.wanted()
    monkeypatch.delenv("KMRUN_DAEMON")
    monkeypatch.setenv("CI", "true")
    assert not daemon.wanted()  # outside a terminal, or in CI: off unless asked
    first = daemon.key()
    monkeypatch.setenv("SOME_UNRELATED_VARIABLE", "x")
    monkeypatch.chdir(tmp_path)
    assert daemon.key() == first  # the child takes these from its client
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert daemon.key() != first  # read when numpy loads: another zygote
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert daemon.home() == tmp_path / f"kmrun-{os.getuid()}"
    (tmp_path / f"kmrun-{os.getuid()}").chmod(0o755)
    assert daemon.home() is None  # others may enter: not used


def test_an_install_or_upgrade_asks_for_another_zygote(monkeypatch, tmp_path):
    """pip adds or swaps a ``*.dist-info`` folder in site-packages, which changes the folder's
    time: a zygote holding the old version of a library it imported no longer serves."""
    from runner import daemon

    site = tmp_path / "lib" / "site-packages"
    (site / "somelib-1.0.dist-info").mkdir(parents=True)
    os.utime(site, ns=(1_000_000_000, 1_000_000_000))
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    before = daemon.key()
    assert daemon.key() == before  # nothing changed: the same zygote
    (site / "somelib-1.0.dist-info").rename(site / "somelib-1.1.dist-info")  # what an upgrade does
    assert daemon.key() != before
