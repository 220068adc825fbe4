"""CPU threads shared among the pipeline's jobs on one machine.

Two processes that each run torch's default thread team (one thread per core) on the same cores slow each
other about 4x on a 2-core VM, up to 15x on another (libgomp's threads spin while they wait for their team, and
the other process holds the core they wait for; bench/RESULTS.md). What a user meets with `dvc queue start -j 2`,
tests beside a run, or two stages at once. One thread per process removes the contention, but a lone job with one
thread is about 1.45x slower. So each job registers itself in a small directory, and its thread count follows the
number of live jobs: ``max(1, cores // jobs)``, re-read every ``interval_s`` at a step or batch boundary. A lone
job keeps torch's default.

A job's entry is a file named by its pid on which it holds an exclusive ``flock`` for its whole life: the kernel
drops the lock however the process ends (SIGKILL included), so an entry whose lock can be taken is stale, whatever
became of its pid since.

Thread counts change the order of floating-point reductions: a run that shared its cores is not bit-identical to
a lone run of the same seed. ``base.threads`` (or ``OMP_NUM_THREADS`` in the environment) fixes the count; the
job still registers, so that others make room for it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

import torch

#: Overrides the registry directory (default: ``<tmp>/pipeline-jobs-<uid>``); jobs that should share their cores
#: must see the same directory.
REGISTRY_ENV = "PIPELINE_JOBS_DIR"


def default_registry() -> Path:
    env = os.environ.get(REGISTRY_ENV)
    return Path(env) if env else Path(tempfile.gettempdir()) / f"pipeline-jobs-{os.getuid()}"


def _held(path: Path) -> bool:
    """Whether a live process holds the lock of the entry ``path``; a stale entry is removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        # Stale: its process is gone. Removed while we hold its lock, so a job that opened the same path
        # meanwhile finds its inode unlinked and makes a new entry (see CoreShare.join).
        path.unlink(missing_ok=True)
        return False
    finally:
        os.close(fd)


def live_jobs(registry: Path) -> list[int]:
    """Pids of the registered jobs that are alive (their entry's lock is held); stale entries are removed."""
    pids = []
    with contextlib.suppress(FileNotFoundError):
        for entry in registry.iterdir():
            if entry.name.isdigit() and _held(entry):
                pids.append(int(entry.name))
    return sorted(pids)


def share(cores: int, jobs: int) -> int:
    """Threads for one of ``jobs`` jobs on ``cores`` cores: an equal share, at least one."""
    return max(1, cores // max(1, jobs))


class CoreShare:
    """This process's registration; :meth:`rebalance` sets torch's thread count to its share."""

    def __init__(self, fixed: int = 0, registry: Path | None = None, interval_s: float = 2.0) -> None:
        self.fixed = fixed
        self.registry = registry or default_registry()
        self.interval_s = interval_s
        # torch's default before anyone changed it: one thread per physical core, or OMP_NUM_THREADS.
        self.cores = torch.get_num_threads()
        self.pid = os.getpid()
        self.entry = self.registry / str(self.pid)
        self.threads = 0
        self._fd: int | None = None
        self._checked = 0.0

    def join(self) -> int:
        self.registry.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.entry, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another job is removing a stale entry of this pid
            try:
                same = os.fstat(fd).st_ino == os.stat(self.entry).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                break
            os.close(fd)  # the entry was removed as stale before we locked it: make a new one
        return self.rebalance(force=True)

    def leave(self) -> None:
        if self._fd is None or os.getpid() != self.pid:  # a forked child never removes its parent's entry
            return
        self.entry.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def rebalance(self, force: bool = False) -> int:
        """Sets the thread count from the jobs alive now; cheap between checks (one clock read)."""
        now = time.monotonic()
        if not force and now - self._checked < self.interval_s:
            return self.threads
        self._checked = now
        jobs = len(set(live_jobs(self.registry)) | {self.pid})  # itself, even if its entry was deleted
        want = self.fixed or share(self.cores, jobs)
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
        return self.threads


_current: CoreShare | None = None


def join(fixed: int = 0) -> CoreShare:
    """Registers this process as a job (once per process) and sets its threads; it leaves at exit.

    ``fixed`` > 0 pins the thread count, as does ``OMP_NUM_THREADS`` set in the environment (a count a user or
    a launcher such as torchrun chose for this process)."""
    global _current
    if not fixed and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        fixed = int(os.environ["OMP_NUM_THREADS"])
    if _current is None or _current.pid != os.getpid():
        _current = CoreShare(fixed)
        _current.join()
        atexit.register(_current.leave)
    else:
        _current.fixed = fixed
        _current.rebalance(force=True)
    return _current


def rebalance() -> None:
    """Called at step and batch boundaries: follows the number of jobs sharing the cores (no-op if not joined)."""
    if _current is not None and _current.pid == os.getpid():  # not in a forked loader worker
        _current.rebalance()
