"""Processes kmrun starts that must not outlive it: a sweep's workers, and the servers
of ``kmrun ui``, ``dashboard`` and ``serve``.

Linux tells a process when its parent dies, even by ``kill -9`` (``PR_SET_PDEATHSIG``);
elsewhere a process left behind is stopped by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the signals that stop kmrun


def die_with_parent(parent: int) -> bool:
    """This process gets SIGTERM when ``parent`` (the process that started it) dies.
    False where the OS cannot tell, or when ``parent`` died already. ``parent`` may be
    process 1 (a container's entry point): only another parent means it died."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False
    return os.getppid() == parent


def serve(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run a server in its own process group until it exits, or until Ctrl-C, SIGTERM or
    SIGHUP: then the whole group (the server's workers too) is stopped. When kmrun is
    killed outright, a guard process stops the group, so no server keeps the port."""
    process = subprocess.Popen(command, env=env or os.environ, start_new_session=True)
    guard = _guard(process.pid)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_group(process.pid, process)
        return 0
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if guard:  # kmrun stopped the server itself: the guard has nothing left to do
            os.kill(guard, signal.SIGKILL)
            os.waitpid(guard, 0)


def stop_group(group: int, leader: subprocess.Popen | None = None) -> None:
    """SIGTERM to every process of ``group``, SIGKILL to those left after 10 s."""
    for sig, patience in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + patience
        try:
            os.killpg(group, sig)
            while time.monotonic() < deadline:
                if leader is not None:
                    leader.poll()  # reap it: a zombie would still count as a member
                time.sleep(0.1)
                os.killpg(group, 0)
        except ProcessLookupError:
            return


def _guard(group: int) -> int:
    """Fork a process that waits for kmrun's death and then stops ``group`` (Linux only);
    its pid, or 0. It holds no terminal or pipe."""
    parent = os.getpid()
    if not sys.platform.startswith("linux"):
        return 0
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # Ctrl-C is kmrun's to handle
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if die_with_parent(parent):
            signal.sigwait({signal.SIGTERM})
        stop_group(group)
    finally:
        os._exit(0)
