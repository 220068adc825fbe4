"""CPU threads shared among the pipeline's jobs (pipeline/cores.py): the share, the registry, real processes."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pipeline import cores

REPO = Path(__file__).resolve().parents[1]


def test_share_is_an_equal_part_of_the_cores_and_at_least_one() -> None:
    assert [cores.share(2, n) for n in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert [cores.share(16, n) for n in (1, 2, 3, 4, 16, 40)] == [16, 8, 5, 4, 1, 1]


def _hold(path: Path) -> int:
    """Another job's entry, as a job holds it: the file, locked for as long as the descriptor stays open."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_registry_counts_locked_entries_and_drops_stale_ones(tmp_path: Path) -> None:
    held = _hold(tmp_path / "4242")
    try:
        # Stale entries: a dead process's pid, and a live pid whose file nobody holds (a pid reused by another
        # process after its job was SIGKILLed): both are removed, whatever runs under that pid now.
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        for pid in (dead.pid, os.getppid()):
            (tmp_path / str(pid)).touch()
        (tmp_path / "notes.txt").touch()  # not a pid: ignored
        assert cores.live_jobs(tmp_path) == [4242]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["4242", "notes.txt"]
    finally:
        os.close(held)  # the job ends: its lock is gone with it
    assert cores.live_jobs(tmp_path) == [] and not (tmp_path / "4242").exists()
    assert cores.live_jobs(tmp_path / "missing") == []


def test_a_sigkilled_job_leaves_no_live_entry(tmp_path: Path) -> None:
    env = {**os.environ, cores.REGISTRY_ENV: str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    code = "import sys, time; from pipeline import cores; cores.join(); print('in', flush=True); time.sleep(60)"
    job = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert job.stdout.readline().strip() == "in"
        assert cores.live_jobs(tmp_path) == [job.pid]
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert (tmp_path / str(job.pid)).exists()  # no atexit ran...
        assert cores.live_jobs(tmp_path) == []  # ...but its lock went with it
    finally:
        job.kill()


def test_rebalance_follows_the_jobs_and_a_fixed_count_wins(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    other = None
    try:
        share = cores.CoreShare(registry=tmp_path, interval_s=3600)
        share.cores = 4
        assert share.join() == 4 and torch.get_num_threads() == 4  # alone: all cores
        other = _hold(tmp_path / "4242")
        assert share.rebalance() == 4  # within the interval: no registry read
        assert share.rebalance(force=True) == 2 and torch.get_num_threads() == 2
        (tmp_path / str(os.getpid())).unlink()  # its own entry deleted (a tmp cleaner): it still counts itself
        assert share.rebalance(force=True) == 2
        os.close(other)
        other = None
        assert share.rebalance(force=True) == 4
        share.leave()
        assert cores.live_jobs(tmp_path) == []
        fixed = cores.CoreShare(fixed=3, registry=tmp_path)
        assert fixed.join() == 3 and torch.get_num_threads() == 3
        fixed.leave()
    finally:
        if other is not None:
            os.close(other)
        torch.set_num_threads(before)


JOB = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from pipeline import cores
    share = cores.join()
    share.cores, share.interval_s = 4, 0.05  # as on a 4-core machine (torch caps its default at the cores)
    out = Path(sys.argv[1])
    deadline = time.time() + 60
    while not Path(sys.argv[2]).exists() and time.time() < deadline:
        cores.rebalance()
        out.write_text(str(torch.get_num_threads()))
        time.sleep(0.02)
    """
)


def _wait_for(path: Path, value: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text() == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path.name}: {path.read_text() if path.exists() else 'missing'}, expected {value}")


def test_real_jobs_split_the_cores_and_a_lone_job_gets_them_back(tmp_path: Path) -> None:
    env = {**os.environ, cores.REGISTRY_ENV: str(tmp_path / "jobs"), "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)  # a count in the environment would be fixed

    def start(name: str) -> subprocess.Popen:
        argv = [sys.executable, "-c", JOB, str(tmp_path / name), str(tmp_path / f"{name}.stop")]
        return subprocess.Popen(argv, env=env)

    a = start("a")
    b = None
    try:
        _wait_for(tmp_path / "a", "4")  # alone: all the cores
        b = start("b")
        _wait_for(tmp_path / "b", "2")
        _wait_for(tmp_path / "a", "2")  # the running job made room
        (tmp_path / "b.stop").touch()
        assert b.wait(30) == 0
        _wait_for(tmp_path / "a", "4")  # and takes the cores back when the other job ends
        (tmp_path / "a.stop").touch()
        assert a.wait(30) == 0
        assert cores.live_jobs(tmp_path / "jobs") == []  # both left the registry at exit
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()


@pytest.mark.parametrize("threads", [0, 3])
def test_setup_joins_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """A stage's setup registers it; with another job alive, base.threads 0 takes half the cores, N takes N."""
    from pipeline.engine.context import setup
    from tests.tiny import tiny_params, write_params

    p = tiny_params()
    p["base"]["threads"] = threads
    monkeypatch.setattr(cores, "_current", None)
    monkeypatch.setenv(cores.REGISTRY_ENV, str(tmp_path / "jobs"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / "jobs").mkdir()
    other = _hold(tmp_path / "jobs" / "4242")
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # as torch's default on a 4-core machine
    try:
        write_params(tmp_path, p)
        setup("warmup", tmp_path / "params.yaml")
        assert cores.live_jobs(tmp_path / "jobs") == sorted([os.getpid(), 4242])
        assert torch.get_num_threads() == (threads or 2)
    finally:
        cores._current.leave()
        os.close(other)
        torch.set_num_threads(before)


def test_omp_num_threads_in_the_environment_is_a_fixed_count(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "_current", None)
    monkeypatch.setenv(cores.REGISTRY_ENV, str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = torch.get_num_threads()
    try:
        share = cores.join()
        assert share.fixed == 3 and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert cores.join(2) is share and torch.get_num_threads() == 2  # a later setup's count is not ignored
    finally:
        cores._current.leave()
        torch.set_num_threads(before)
