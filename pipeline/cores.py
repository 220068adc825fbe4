"""CPU threads shared among the pipeline's jobs on one machine.

Two processes that each run torch's default thread team (one thread per core) on the same cores slow each
other about 4x on a 2-core VM, up to 15x on another (libgomp's threads spin while they wait for their team, and
the other process holds the core they wait for; bench/RESULTS.md). What a user meets with `dvc queue start -j 2`,
tests beside a run, or two stages at once. One thread per process removes the contention, but a lone job with one
thread is about 1.45x slower. So each job registers itself in a small directory of pid files, and its thread
count follows the number of live jobs: ``max(1, cores // jobs)``, re-read every ``interval_s`` at a step or batch
boundary. A lone job keeps torch's default.

Thread counts change the order of floating-point reductions: a run that shared its cores is not bit-identical to
a lone run of the same seed. ``base.threads`` fixes the count (the job still registers, so that others make
room for it).
"""

from __future__ import annotations

import atexit
import contextlib
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def live_jobs(registry: Path) -> list[int]:
    """Pids registered in ``registry`` whose process is alive; entries of dead processes (a SIGKILLed job) are
    removed."""
    pids = []
    with contextlib.suppress(FileNotFoundError):
        for entry in registry.iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if _alive(pid):
                pids.append(pid)
            else:
                entry.unlink(missing_ok=True)
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
        self.entry = self.registry / str(os.getpid())
        self.threads = 0
        self._checked = 0.0

    def join(self) -> int:
        self.registry.mkdir(parents=True, exist_ok=True)
        self.entry.touch()
        return self.rebalance(force=True)

    def leave(self) -> None:
        self.entry.unlink(missing_ok=True)

    def rebalance(self, force: bool = False) -> int:
        """Sets the thread count from the jobs alive now; cheap between checks (one clock read)."""
        now = time.monotonic()
        if not force and now - self._checked < self.interval_s:
            return self.threads
        self._checked = now
        want = self.fixed or share(self.cores, len(live_jobs(self.registry)))
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
        return self.threads


_current: CoreShare | None = None


def join(fixed: int = 0) -> CoreShare:
    """Registers this process as a job (once per process) and sets its threads; it leaves at exit."""
    global _current
    if _current is None or _current.entry.name != str(os.getpid()):
        _current = CoreShare(fixed)
        _current.join()
        atexit.register(_current.leave)
    return _current


def rebalance() -> None:
    """Called at step and batch boundaries: follows the number of jobs sharing the cores (no-op if not joined)."""
    if _current is not None and _current.entry.name == str(os.getpid()):  # not in a forked loader worker
        _current.rebalance()
