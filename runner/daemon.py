"""A kept-alive process that has imported kmrun's libraries, and forks a fresh child per command.

A ``kmrun`` command spends most of a second or more importing MLflow, its SQL store, Kedro,
Hydra and Optuna before it does anything. With the daemon, the command (the *client*)
hands its arguments, working directory, environment and terminal to a *zygote* that has
those libraries imported already; the zygote forks a child that runs the command as
``kmrun`` would, and the client waits for it and exits with its code.

What keeps a result the same as without it:
- The zygote imports third-party libraries only. kmrun's own modules and the Kedro
  project's code are imported by each child, after the fork, so an edit is never stale.
- A zygote serves one interpreter, one ``sys.path``, the same installed packages (the
  modification times of the ``site-packages`` folders, which an install or upgrade changes)
  and the same values of the variables read at import (``IMPORT_TIME_VARIABLES``): the
  *key* in its socket's name. Anything else asks for another zygote.
- Each child takes the client's environment, working directory, umask and terminal, and
  numpy's global random state is seeded afresh.

Never two users: the socket lives in a folder only its user can enter (0700, checked),
and the zygote checks each client's uid (``SO_PEERCRED``). If the zygote is killed, the
next command runs without it and starts a new one. It stops after ``IDLE`` seconds
without a command, and ``kmrun daemon stop`` stops it. Ctrl-C and SIGTERM reach the
child's process group; a client that dies (kill -9) takes its child's group with it.

Used when ``KMRUN_DAEMON=1``; with ``KMRUN_DAEMON`` unset, only in an interactive
terminal outside CI; never with ``KMRUN_DAEMON=0``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

IDLE = float(os.environ.get("KMRUN_DAEMON_IDLE", 900))  # seconds without a command before a zygote stops
CONNECT_SECONDS = 10.0  # the most a command waits for a zygote's answer before it runs by itself
MAX_ZYGOTES = 2  # per user: starting another stops the oldest
IMPORT_TIME_VARIABLES = ("PYTHON", "OMP_", "OPENBLAS_", "MKL_", "NUMEXPR_", "VECLIB_", "KMP_", "LD_", "CUDA_",
                         "MLFLOW_", "KEDRO_", "HYDRA_", "OPTUNA_", "SQLALCHEMY_")
PRELOAD = ("mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy", "hydra",
           "omegaconf", "optuna", "kedro.framework.session", "kedro.framework.startup", "kedro.io", "rich.console",
           "rich.table", "pandas")


def wanted() -> bool:
    setting = os.environ.get("KMRUN_DAEMON", "")
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stdout.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")


def folder() -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"kmrun-{os.getuid()}"


def home() -> Path | None:
    """This user's folder for zygote sockets, made 0700; None if it is not safely ours."""
    root = folder()
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        found = root.lstat()
    except OSError:
        return None
    if found.st_uid != os.getuid() or found.st_mode & 0o077 or not root.is_dir() or root.is_symlink():
        return None
    return root


def key() -> str:
    """What a zygote must share with a client to serve it (see the module's docstring)."""
    stamps: list[tuple[str, int | None]] = []
    for entry in sys.path:  # an install or upgrade changes its site-packages folder
        installed = "site-packages" in entry or "dist-packages" in entry
        with contextlib.suppress(OSError):
            stamps.append((entry, os.stat(entry).st_mtime_ns if installed else None))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_TIME_VARIABLES))
    # what a forked child cannot take on: the groups and the cgroup (a SLURM job's, a systemd unit's)
    text = json.dumps([os.path.realpath(sys.executable), stamps, env, sorted(os.getgroups()), _cgroup()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cgroup() -> str:
    try:
        return Path("/proc/self/cgroup").read_text()
    except OSError:
        return ""


def limits() -> dict[str, Any]:
    """This process's limits and scheduling, which a child of the zygote takes on."""
    import resource

    found: dict[str, Any] = {"rlimits": {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource)
                                         if name.startswith("RLIMIT_")}}
    with contextlib.suppress(OSError, AttributeError):
        found["affinity"] = sorted(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        found["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
    return found


def take_on(wanted: dict[str, Any]) -> str | None:
    """Make this process's limits and scheduling ``wanted`` (the client's); why not, when it
    cannot (a limit above the zygote's hard limit, a lower nice value without privilege)."""
    import resource

    for name, (soft, hard) in wanted.get("rlimits", {}).items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            if tuple(resource.getrlimit(which)) != (soft, hard):
                resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError) as err:
            return f"{name} {soft}/{hard}: {err}"
    try:
        if "affinity" in wanted and sorted(os.sched_getaffinity(0)) != wanted["affinity"]:
            os.sched_setaffinity(0, wanted["affinity"])
        if "nice" in wanted and os.getpriority(os.PRIO_PROCESS, 0) != wanted["nice"]:
            os.setpriority(os.PRIO_PROCESS, 0, wanted["nice"])
    except (OSError, AttributeError) as err:
        return f"scheduling: {err}"
    return None


# ---- the client: a `kmrun` command ----

def forward(argv: list[str]) -> int | None:
    """Run ``kmrun argv`` in a zygote's child and return its exit code; None when no zygote
    serves this client (one is started for the next command)."""
    sockets = home()
    if sockets is None:
        return None
    path = sockets / f"{key()}.sock"
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(CONNECT_SECONDS)  # a zygote that is gone refuses at once; one that hangs is not waited for
    try:
        client.connect(str(path))
    except OSError:
        client.close()
        start(sockets, path)
        return None
    with client:
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # started in the background: Ctrl-C is not ours
        request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(), "path": sys.path,
                   "sigint_ignored": ignored, "limits": limits()}
        try:
            socket.send_fds(client, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
            reader = client.makefile("rb")
            first = reader.readline()
        except OSError:  # no answer in time (its child, if one was forked, sees us gone and ends): run here
            return None
        if not first.startswith(b"pid "):  # refused, or the zygote died before forking: run here
            return None
        client.settimeout(None)
        child = int(first.split()[1])
        relay = _relay_signals(child, ignored)
        try:
            last = reader.readline()
        finally:
            for sig, handler in relay.items():
                signal.signal(sig, handler)
        if last.startswith(b"exit "):
            return int(last.split()[1])
        print("kmrun: the daemon's process running this command ended without an exit status "
              "(it was killed). Run it again; KMRUN_DAEMON=0 runs it without the daemon.", file=sys.stderr)
        return 137


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _relay_signals(child: int, sigint_ignored: bool) -> dict[int, Any]:
    """Ctrl-C and SIGTERM of the client go to the child's process group (a terminal sends
    Ctrl-C to the client's group, which the child is not in); an ignored Ctrl-C stays so."""
    def relay(sig: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, sig)

    def suspend(sig: int, frame: object) -> None:  # Ctrl-Z: the command stops with us, and goes on with us
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, suspend)  # `fg` sent SIGCONT: we run again, and so does the command
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signal.SIGCONT)

    relayed = (signal.SIGTERM, signal.SIGHUP) if sigint_ignored else (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved: dict[int, Any] = {sig: signal.signal(sig, relay) for sig in relayed}
    saved[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, suspend)
    return saved


def start(sockets: Path, path: Path) -> None:
    """A zygote for this key, in the background (it outlives the command that started it)."""
    stop_oldest(sockets)
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-c", "import runner.daemon as d, sys; d.serve(sys.argv[1])", str(path)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True, cwd=sockets)


def zygotes(sockets: Path) -> list[dict[str, Any]]:
    """Each live zygote's status (pid, key, started, last command, children)."""
    found = []
    for path in sorted(sockets.glob("*.sock")):
        answer = _ask(path, "status")
        if answer is None:
            with contextlib.suppress(OSError):
                path.unlink()  # its zygote is gone (killed): nothing listens
            continue
        found.append(answer)
    return found


def stop_oldest(sockets: Path) -> None:
    running = sorted(zygotes(sockets), key=lambda z: z["last"])
    for zygote in running[:max(0, len(running) - MAX_ZYGOTES + 1)]:
        _ask(Path(zygote["socket"]), "stop")


def stop_all(sockets: Path) -> int:
    running = zygotes(sockets)
    for zygote in running:
        _ask(Path(zygote["socket"]), "stop")
    return len(running)


def _ask(path: Path, op: str) -> dict[str, Any] | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
            socket.send_fds(client, [json.dumps({"op": op}).encode() + b"\n"], [])
            return json.loads(client.makefile("rb").readline() or b"null")
    except (OSError, ValueError):
        return None


def command(args: list[str]) -> int:
    """``kmrun daemon status|stop``."""
    action = args[0] if args else "status"
    if action not in ("status", "stop") or len(args) > 1:
        print("usage: kmrun daemon [status|stop]", file=sys.stderr)
        return 2
    sockets = home()
    if sockets is None:
        print(f"daemon: not used: {folder()} is not a folder only you can enter (yours, mode 0700). "
              "Remove it, or set XDG_RUNTIME_DIR to such a folder.")
        return 0
    if action == "stop":
        print(f"stopped {stop_all(sockets)} daemon process(es)")
        return 0
    running = zygotes(sockets)
    state = "on" if wanted() else "off (KMRUN_DAEMON=1 turns it on)"
    print(f"daemon: {state}; {len(running)} running in {sockets}")
    for zygote in running:
        print(f"  pid {zygote['pid']}  key {zygote['key']}  up {time.time() - zygote['started']:.0f} s  "
              f"idle {time.time() - zygote['last']:.0f} s  commands running {zygote['children']}")
    return 0


# ---- the zygote ----

def serve(path_text: str) -> None:
    """Listen on ``path`` until ``IDLE`` seconds pass with neither a command nor a child."""
    path = Path(path_text)
    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115  (held for the zygote's life)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another zygote serves this key
    sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]
    # Kedro configures logging when it is imported, from the working directory: here it is given a
    # config that changes nothing, and each child applies the real one when its command first uses Kedro
    quiet = path.with_suffix(".logging.yml")
    quiet.write_text("version: 1\ndisable_existing_loggers: false\n")
    saved = os.environ.get("KEDRO_LOGGING_CONFIG")
    os.environ["KEDRO_LOGGING_CONFIG"] = str(quiet)
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            __import__(name)
    if saved is None:
        os.environ.pop("KEDRO_LOGGING_CONFIG", None)
    else:
        os.environ["KEDRO_LOGGING_CONFIG"] = saved
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    started = last = time.time()
    children: set[int] = set()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while children or time.time() - last < IDLE:
            ready, _, _ = select.select([listener], [], [], 1.0)
            children -= _reaped(children)
            if not ready:
                continue
            conn, _ = listener.accept()
            op = _serve_one(conn, children, (listener, lock))
            if op == "command":
                last = time.time()
            elif isinstance(op, dict):  # status
                conn.sendall(json.dumps({"pid": os.getpid(), "key": path.stem, "socket": str(path),
                                         "started": started, "last": last, "children": len(children)}).encode() + b"\n")
            elif op == "stop":
                conn.sendall(b"{}\n")
                conn.close()
                break
            conn.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.exists() and path.stat().st_ino == os.fstat(listener.fileno()).st_ino:
                path.unlink()
        listener.close()


def _reaped(children: set[int]) -> set[int]:
    done = set()
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                done.add(pid)
    return done


def _serve_one(conn: socket.socket, children: set[int], held: tuple[Any, ...]) -> str | dict[str, Any] | None:
    """One connection: a status or stop request, or a command forked into a child."""
    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    if uid != os.getuid():
        return None  # never another user's command
    conn.settimeout(5)
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                return None
            data += more
        request = json.loads(data)
    except (OSError, ValueError):
        return None
    if "op" in request:
        return {} if request["op"] == "status" else str(request["op"])
    if len(fds) != 3:
        return None
    pid = os.fork()
    if pid == 0:
        for kept in held:  # the listener and the zygote's lock are the zygote's alone: a command that outlives a
            kept.close()  # killed or stopped zygote must not keep new commands waiting, nor a new zygote out
        _child(conn, fds, request)  # never returns
    for fd in fds:
        os.close(fd)
    children.add(pid)
    return "command"


def _child(conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
    """In the fork: become the client's command, then tell it the exit code."""
    code, finishing = 3, threading.Event()
    try:
        os.setpgid(0, 0)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        # Ctrl-C as the client had it (not as the zygote's starter had it): Python's own handler, or ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN if request.get("sigint_ignored") else signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"], KMRUN_DAEMON="0")  # the command, and what it starts, run here
        os.umask(request["umask"])
        refused = take_on(request.get("limits", {}))
        if refused is not None:  # this zygote cannot run it as the client would: the client runs it itself
            conn.sendall(f"refused {refused}\n".encode())
            os._exit(0)
        sys.path[:] = request["path"]
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.argv = ["kmrun", *request["argv"]]
        _as_a_new_process()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # not the zygote's state: each command its own
        conn.settimeout(None)
        conn.sendall(f"pid {os.getpid()}\n".encode())
        threading.Thread(target=_watch_client, args=(conn, finishing), daemon=True).start()
        for name in [m for m in sys.modules if m == "runner" or m.startswith("runner.")]:
            del sys.modules[name]  # kmrun's own code, as it is on disk now
        from runner import cli

        code = cli.main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # reported as kmrun reports a bug
        import traceback

        traceback.print_exc()
        code = 3
    finally:
        finishing.set()
        with contextlib.suppress(BaseException):
            import atexit

            for thread in threading.enumerate():  # as an interpreter's exit does: non-daemon threads first
                if thread is not threading.current_thread() and not thread.daemon:
                    thread.join()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.sendall(f"exit {code}\n".encode())
        os._exit(code)


def _as_a_new_process() -> None:
    """What a new interpreter reads from its environment and working directory at start, read
    again: the time zone, the locale, and Kedro's logging config (``KEDRO_LOGGING_CONFIG``, else
    ``conf/logging.yml`` here), which a plain process applies when it imports Kedro: here when
    the command first bootstraps a project, so that a command that never uses Kedro (``kmrun
    runs``) keeps Python's own logging, as it does without the daemon."""
    import locale

    time.tzset()
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_CTYPE, "")
    startup = sys.modules.get("kedro.framework.startup")
    if startup is not None:  # Kedro's logging config, as a plain process applies it: when Kedro is first used
        bootstrap = startup.bootstrap_project

        def bootstrap_with_logging(*args: Any, **kwargs: Any) -> Any:
            setattr(startup, "bootstrap_project", bootstrap)  # noqa: B010  (once is enough)
            project = sys.modules.get("kedro.framework.project")
            if project is not None:
                with contextlib.suppress(Exception):  # a bad logging file: Kedro says so itself
                    logging_ = getattr(project, "LOGGING")  # noqa: B009  (a UserDict Kedro fills in its __init__)
                    logging_.__init__()
            return bootstrap(*args, **kwargs)

        setattr(startup, "bootstrap_project", bootstrap_with_logging)  # noqa: B010


def _watch_client(conn: socket.socket, finishing: threading.Event) -> None:
    """The client went away (killed): its command goes too, as it would have without the daemon."""
    with contextlib.suppress(OSError):
        while conn.recv(1024):
            pass
    if not finishing.is_set():
        os.killpg(0, signal.SIGKILL)
