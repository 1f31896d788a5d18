"""Whether the process that owns a run or a trial still lives: the one place that knows.

A process signs what it owns with its host, its PID and, where the OS tells (Linux), when
it started: its boot's id and its start time since boot. A PID alone is not enough: after
a reboot, or on a busy machine, another process may hold the same PID, and the dead
owner's run would look alive forever. Owners on other hosts cannot be checked here; their
liveness comes from PostgreSQL's advisory locks (``locks.RunLocks``) or Optuna's
heartbeats (``trial``).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def host_name() -> str:
    """This machine's name in kmrun's records: $KMRUN_HOST, else the host name."""
    return os.environ.get("KMRUN_HOST") or socket.gethostname()


def started(pid: int) -> str:
    """When process ``pid`` started, as ``BOOT-TICKS`` (Linux), or "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    ticks = stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name
    return f"{_boot_id()}-{ticks}"


@functools.cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "?"


def in_worker() -> bool:
    """Whether this process runs jobs for a sweep's driver: a forked worker, or a Ray task."""
    import multiprocessing

    return multiprocessing.parent_process() is not None or bool(os.environ.get("KMRUN_RAY_NODE"))


def process_tags() -> dict[str, str]:
    """What a run records of the process that owns it."""
    pid = os.getpid()
    tags = {"kmrun.host": host_name(), "kmrun.pid": str(pid), "kmrun.started": started(pid)}
    if os.environ.get("KMRUN_RAY_NODE"):  # a Ray worker (raycluster): which node of the cluster
        tags["kmrun.ray_node"] = os.environ["KMRUN_RAY_NODE"]
    return tags


def alive(pid: int, since: str = "") -> bool:
    """Whether process ``pid`` of this host exists and, given ``since`` (``started``),
    is the same process that recorded it (not a later one that reuses its PID)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not since or started(pid) in ("", since)


def owner_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process a run's tags name lives (another host's: assumed so)."""
    if tags.get("kmrun.host") != host_name():
        return True
    pid = tags.get("kmrun.pid", "")
    return pid.isdigit() and alive(int(pid), tags.get("kmrun.started", ""))


_stale_trials: list[Any] = []  # trials Optuna failed as stale in this process, not yet taken


def note_stale_trial(study: Any, trial: Any) -> None:
    """Optuna's ``heartbeat_stale_trial_callback``: a trial whose heartbeat stopped, failed."""
    _stale_trials.append(trial)


def stale_trials() -> list[Any]:
    """The trials Optuna failed as stale since the last call (``note_stale_trial``)."""
    taken = list(_stale_trials)
    _stale_trials.clear()
    return taken


def owner_label() -> str:
    """This process as a trial's owner: ``HOST:PID:STARTED``."""
    tags = process_tags()
    return f"{tags['kmrun.host']}:{tags['kmrun.pid']}:{tags['kmrun.started']}"


def owner_gone(label: str) -> bool:
    """Whether the owner ``label`` names (``owner_label``, or the older ``HOST:PID``) is a
    process of this host that no longer lives. Another host's owner: False."""
    parts = label.rsplit(":", 2)
    if len(parts) == 2 or (len(parts) == 3 and not parts[1].isdigit()):
        parts = [*label.rsplit(":", 1), ""]
    host, pid, since = (parts + ["", "", ""])[:3]
    return host == host_name() and pid.isdigit() and not alive(int(pid), since)
