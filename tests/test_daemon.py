"""The daemon (``runner/daemon.py``): real zygote processes, real signals. Each test has its
own socket folder (``XDG_RUNTIME_DIR``) and stops its zygotes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


PROBE_NODES = '''import json, locale, logging, os, resource, threading, time


def probe(x):
    logging.getLogger("probe").info("PROBE-LINE")
    out = os.environ["PROBE_OUT"]
    time.sleep(float(os.environ.get("PROBE_SLEEP", "0")))

    def later():
        time.sleep(0.5)
        with open(out + ".thread", "w") as handle:
            handle.write("done")

    threading.Thread(target=later).start()  # not a daemon thread: the interpreter waits for it
    with open(out, "w") as handle:
        json.dump({"tz_hour": time.localtime(0).tm_hour, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
                   "affinity": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                   "root_level": logging.getLogger().getEffectiveLevel(), "ctype": locale.setlocale(locale.LC_CTYPE),
                   "pid": os.getpid()}, handle)
    return {"score": float(x)}
'''
PROBE_PIPELINE = '''from kedro.pipeline import Pipeline, node

from kmrun_par import nodes


def register_pipelines():
    return {"__default__": Pipeline([node(nodes.probe, "params:x", "metrics", name="probe")])}
'''
MARKED_LOGGING = """version: 1
disable_existing_loggers: false
formatters:
  marked: {format: "KMLOG|%(levelname)s|%(name)s|%(message)s"}
handlers:
  console: {class: logging.StreamHandler, formatter: marked, stream: "ext://sys.stdout"}
root: {level: INFO, handlers: [console]}
"""


@pytest.fixture
def probe_ws(tmp_path, template_store):
    from kedro_projects import project

    root = tmp_path / "ws"
    project(root, "kmrun_par", PROBE_PIPELINE, {"src/kmrun_par/nodes.py": PROBE_NODES}, {"x": 1.0}, {},
            {"metrics": ["metrics"], "objective": {"metric": "score", "direction": "maximize"}}, template_store)
    (root / "conf" / "logging.yml").write_text(MARKED_LOGGING)  # Kedro reads it from the working directory
    return root


def socket_of(tmp_path) -> list[Path]:
    """The socket of the zygote a test's first command started."""
    found = lambda: list((tmp_path / "runtime").glob("kmrun-*/*.sock"))  # noqa: E731
    assert eventually(lambda: bool(found()), 120), "no zygote started"
    return found()


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def in_a_terminal(where, env: dict[str, str], *args: str, limited: bool = False, out: str = "") -> tuple[int, str]:
    """``kmrun args`` in a pseudo-terminal; with ``limited``, under a lower file limit, one CPU and nice 5."""
    import pty
    import resource

    def limit() -> None:
        if limited:
            resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))
            os.sched_setaffinity(0, {0})
            os.nice(5)

    master, slave = pty.openpty()
    full = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "PROBE_OUT": out, "TERM": "xterm-256color", **env}
    if "NO_COLOR" not in env:  # colour as a terminal has it, unless the test asks otherwise
        full.pop("NO_COLOR", None)
    child = subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=where, env=full, stdin=slave,
                             stdout=slave, stderr=slave, preexec_fn=limit)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return child.wait(timeout=300), b"".join(chunks).decode(errors="replace")


@slow
def test_a_served_command_behaves_as_a_plain_one_in_a_terminal(probe_ws, daemon_env, tmp_path):
    """Through a warm zygote started by another command (default limits, no TZ), a command in
    a terminal takes on its caller's TZ, file limit, CPU affinity, nice value, the project's
    logging config and colour, and its non-daemon threads finish, as without the daemon."""
    from runner.daemon import _ask

    assert subprocess.run([sys.executable, "-m", "runner.cli", "cache"], cwd=probe_ws, env={**os.environ, **daemon_env},
                          capture_output=True, timeout=300).returncode == 0
    sockets = socket_of(tmp_path)
    seen = {}
    for mode, setting in (("plain", "0"), ("served", "1")):
        before = _ask(sockets[0], "status")["last"]
        out = str(tmp_path / f"{mode}.json")
        code, text = in_a_terminal(probe_ws, {**daemon_env, "KMRUN_DAEMON": setting, "TZ": "Asia/Tokyo"},
                                   "cache=false", "-v", limited=True, out=out)
        assert code == 0, text[-3000:]
        assert (_ask(sockets[0], "status")["last"] > before) == (mode == "served")  # it was (or was not) served
        assert "KMLOG|INFO|probe|PROBE-LINE" in text, text[-3000:]  # the project's logging config, in both
        assert Path(out + ".thread").read_text() == "done"  # the node's thread finished before the exit
        seen[mode] = {**json.loads(Path(out).read_text()), "coloured": "\x1b[" in text}
        code, text = in_a_terminal(probe_ws, {**daemon_env, "KMRUN_DAEMON": setting, "NO_COLOR": "1"}, "runs")
        seen[mode]["no_color_coloured"] = "\x1b[" in text
    plain, served = (dict(seen[m]) for m in ("plain", "served"))
    assert plain.pop("pid") != served.pop("pid")
    assert plain == served, (plain, served)
    assert plain["tz_hour"] == 9 and plain["nofile"] == [512, 512] and plain["affinity"] == [0] and plain["nice"] == 5


@slow
def test_a_command_after_the_zygote_is_killed_mid_command_runs_at_once(probe_ws, daemon_env, tmp_path):
    """The running command's child holds neither the listener nor the zygote's lock: the next
    command is refused at once, runs by itself, and a new zygote can start."""
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", **daemon_env, "KMRUN_DAEMON": "1"}
    subprocess.run([sys.executable, "-m", "runner.cli", "cache"], cwd=probe_ws, env=env, capture_output=True, timeout=300)
    sockets = socket_of(tmp_path)
    from runner.daemon import _ask

    zygote = _ask(sockets[0], "status")["pid"]
    long = subprocess.Popen([sys.executable, "-m", "runner.cli", "cache=false"], cwd=probe_ws, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**env, "PROBE_OUT": str(tmp_path / "long.json"),
                                                            "PROBE_SLEEP": "120"})
    assert eventually(lambda: _ask(sockets[0], "status")["children"] == 1, 60)
    os.kill(zygote, signal.SIGKILL)
    started = time.monotonic()
    quick = subprocess.run([sys.executable, "-m", "runner.cli", "cache"], cwd=probe_ws, env=env, capture_output=True,
                           timeout=110)
    assert quick.returncode == 0 and time.monotonic() - started < 60, quick.stderr
    assert eventually(lambda: [p for p in (tmp_path / "runtime").glob("kmrun-*/*.sock")
                               if (_ask(p, "status") or {}).get("pid") not in (None, zygote)], 120), "no new zygote"
    long.kill()
    long.wait()


@slow
def test_ctrl_z_stops_the_whole_command_and_fg_resumes_it(probe_ws, daemon_env, tmp_path):
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", **daemon_env, "KMRUN_DAEMON": "1"}
    subprocess.run([sys.executable, "-m", "runner.cli", "cache"], cwd=probe_ws, env=env, capture_output=True, timeout=300)
    sockets = socket_of(tmp_path)
    from runner.daemon import _ask

    client = subprocess.Popen([sys.executable, "-m", "runner.cli", "cache=false"], cwd=probe_ws,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**env, "PROBE_OUT": str(tmp_path / "z.json"), "PROBE_SLEEP": "6"})
    assert eventually(lambda: _ask(sockets[0], "status")["children"] == 1, 60)
    zygote = _ask(sockets[0], "status")["pid"]
    [child] = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == zygote]
    client.send_signal(signal.SIGTSTP)  # what Ctrl-Z sends to the terminal's foreground group

    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    assert eventually(lambda: state(client.pid) == "T" and state(child) == "T", 30), "not every part stopped"
    time.sleep(8)  # longer than the node sleeps: a command that ran on would be done by now
    assert client.poll() is None and not (tmp_path / "z.json").exists()
    client.send_signal(signal.SIGCONT)  # `fg`
    assert client.wait(timeout=120) == 0
    assert (tmp_path / "z.json").exists()


@slow
def test_a_deleted_working_directory_is_one_clear_message_with_or_without_the_daemon(tmp_path, daemon_env):
    gone = tmp_path / "gone"
    gone.mkdir()
    for setting in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", "import os, sys; os.rmdir(sys.argv[1]); "
                               "from runner.cli import main; sys.exit(main(['+experiment=baseline']))", str(gone)],
                              cwd=gone, env={**os.environ, **daemon_env, "KMRUN_DAEMON": setting}, capture_output=True,
                              text=True, timeout=60)
        gone.mkdir()
        assert done.returncode == 2 and "working directory no longer exists" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
