"""Where jobs run: the one seam between deciding what to run and running it.

``submit(spec)`` takes a ``JobSpec`` (plain data) and returns a future of its
``JobResult``. ``Inline`` runs one job at a time in this process; ``Workers`` runs them
in worker processes. A scheduler of remote workers (many machines on one shared store)
or one that consults a node cache first is another class with the same three methods;
nothing else changes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Protocol

from .job import JobSpec, execute
from .processes import STOPS, die_with_parent
from .records import JobResult

if TYPE_CHECKING:
    from .schema import RayConf

log = logging.getLogger(__name__)


class Scheduler(Protocol):
    size: int  # jobs at a time

    def submit(self, spec: JobSpec) -> Future[JobResult]: ...

    def __enter__(self) -> Scheduler: ...

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None: ...


class Inline:
    """One job at a time, in this process (with ``gpu_slots``, on the first slot's GPUs)."""

    size = 1

    def __init__(self, gpu_slots: Sequence[str] = ()) -> None:
        self.gpu_slot = gpu_slots[0] if gpu_slots else None
        self._saved: str | None = None

    def submit(self, spec: JobSpec) -> Future[JobResult]:
        future: Future[JobResult] = Future()
        future.set_result(execute(spec))
        return future

    def __enter__(self) -> Inline:
        if self.gpu_slot is not None:
            self._saved = os.environ.get(CUDA)
            os.environ[CUDA] = self.gpu_slot
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if self.gpu_slot is not None:
            if self._saved is None:
                os.environ.pop(CUDA, None)
            else:
                os.environ[CUDA] = self._saved


class Workers:
    """Jobs in ``size`` worker processes; a free worker takes the next job at once.

    Workers are forked where the OS allows it, on entering the ``with`` block and before
    kmrun starts any thread (a progress bar, a heartbeat): they start at once and inherit
    the bootstrapped Kedro project, so a job costs what it costs in-process. Each worker
    drops the database connections it inherited before its first job. Elsewhere workers
    are spawned and bootstrap once each.
    """

    def __init__(self, size: int, verbose: bool = False, gpu_slots: Sequence[str] = ()) -> None:
        import multiprocessing

        self.size, self.verbose, self.gpu_slots = size, verbose, list(gpu_slots)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self._executor = self._pool(method)

    def _pool(self, method: str) -> ProcessPoolExecutor:
        import multiprocessing

        context = multiprocessing.get_context(method)
        slots = context.Queue() if self.gpu_slots else None  # each worker takes its own GPUs
        for slot in self.gpu_slots[: self.size]:
            slots.put(slot)  # type: ignore[union-attr]
        return ProcessPoolExecutor(self.size, mp_context=context, initializer=_worker_init,
                                   initargs=(self.verbose, os.getpid(), slots))

    def submit(self, spec: JobSpec) -> Future[JobResult]:
        try:
            return self._executor.submit(_run, spec)
        except BrokenProcessPool:
            # A worker died (killed, out of memory): the jobs it and its pool were running
            # come back FAILED; new workers take the rest. They are spawned, not forked,
            # since threads run by now (a fork would copy their locks).
            log.warning("A worker process died; starting new workers for the remaining jobs.")
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._pool("spawn")
            return self._executor.submit(_run, spec)

    def __enter__(self) -> Workers:
        self._executor.submit(os.getpid).result()  # forks every worker now, while no thread runs
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            # Workers get SIGINT too on Ctrl-C in a terminal, but not a SIGTERM sent to this
            # process alone: tell them, so each ends its run KILLED instead of finishing.
            import multiprocessing

            for child in multiprocessing.active_children():
                if child.pid is not None:
                    os.kill(child.pid, signal.SIGINT)
        self._executor.shutdown(wait=True, cancel_futures=True)


def make_scheduler(n_jobs: int, verbose: bool = False, ray: RayConf | None = None,
                   gpu_slots: Sequence[str] = (), warm: JobSpec | None = None) -> Scheduler:
    """``Inline`` for one job at a time, else ``Workers``; with ``ray`` settings, Ray tasks
    (``raycluster``: ``connect`` comes first). ``gpu_slots``: the GPUs each local worker
    sees (``gpu_slots``), as many workers as slots at most."""
    if ray is not None:
        from .raycluster import RayWorkers

        return RayWorkers(n_jobs, ray, verbose, warm)  # warm: a spec whose project each worker loads first
    return Workers(n_jobs, verbose, gpu_slots) if n_jobs > 1 else Inline(gpu_slots)


CUDA = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """The GPUs this machine shows a job: ``CUDA_VISIBLE_DEVICES`` when set, else the ones
    ``nvidia-smi -L`` lists (none without it)."""
    if CUDA in os.environ:
        return [d.strip() for d in os.environ[CUDA].split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    lines = [line for line in done.stdout.splitlines() if line.startswith("GPU ")] if done.returncode == 0 else []
    return [str(index) for index in range(len(lines))]


def gpu_slots(devices: Sequence[str], per_job: float) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` for each job that fits at once when each asks for ``per_job``
    GPUs: 2 GPUs and 1 per job → "0", "1"; 0.5 per job → "0", "0", "1", "1"; 2 per job on 4
    → "0,1", "2,3"."""
    if per_job <= 0:
        return []
    fit, width = int(len(devices) / per_job + 1e-9), max(1, math.ceil(per_job))
    return [",".join(devices[int(i * per_job): int(i * per_job) + width]) for i in range(fit)]


def _worker_init(verbose: bool, parent: int, slots: Any = None) -> None:
    from . import runtime

    if slots is not None:
        os.environ[CUDA] = slots.get(timeout=30)

    for sig in STOPS:
        signal.signal(sig, _worker_interrupt)
    # a worker whose kmrun died (even by kill -9) gets SIGTERM: it ends its run KILLED and leaves
    if not die_with_parent(parent) and os.getppid() != parent:
        os._exit(130)  # kmrun died before this worker could be told
    if not verbose:
        logging.disable(logging.INFO)
    runtime.current().after_fork()


def _run(spec: JobSpec) -> JobResult:
    """A job in a worker. After an interrupt the worker has done its part once its run is
    ended KILLED: it leaves at once. When kmrun was interrupted, kmrun stops the sweep
    itself; when only this worker was told to stop (SIGTERM from a container runtime, its
    parent's death, a signal sent to it alone), the sweep sees a lost worker, whose job
    runs again, as after ``kill -9``."""
    global _IN_JOB
    _IN_JOB = True
    try:
        return execute(spec)
    except KeyboardInterrupt:
        os._exit(143 if _TERMINATED else 130)
    finally:
        _IN_JOB = False


_IN_JOB = False  # whether this worker is running a job now
_TERMINATED = False  # whether this worker got SIGTERM (not the sweep's Ctrl-C)


def _worker_interrupt(signum: int, frame: object) -> None:
    """Once: the running job ends its run KILLED; further signals must not cut that short.
    An idle worker has nothing to end: it leaves quietly."""
    global _TERMINATED
    for sig in STOPS:
        signal.signal(sig, signal.SIG_IGN)
    if not _IN_JOB:
        os._exit(130)
    _TERMINATED = signum == signal.SIGTERM
    raise KeyboardInterrupt
