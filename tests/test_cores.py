"""CPU threads shared among the pipeline's jobs (pipeline/cores.py): the share, the registry, real processes."""

from __future__ import annotations

import os
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


def test_registry_counts_live_processes_and_drops_dead_ones(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (os.getpid(), dead.pid, sleeper.pid):
            (tmp_path / str(pid)).touch()
        (tmp_path / "notes.txt").touch()  # not a pid: ignored
        assert cores.live_jobs(tmp_path) == sorted([os.getpid(), sleeper.pid])
        assert not (tmp_path / str(dead.pid)).exists()  # a SIGKILLed job's entry is cleaned up
    finally:
        sleeper.kill()
        sleeper.wait()
    assert cores.live_jobs(tmp_path) == [os.getpid()]
    assert cores.live_jobs(tmp_path / "missing") == []


def test_rebalance_follows_the_jobs_and_a_fixed_count_wins(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        share = cores.CoreShare(registry=tmp_path, interval_s=3600)
        share.cores = 4
        assert share.join() == 4 and torch.get_num_threads() == 4  # alone: all cores
        (tmp_path / str(other.pid)).touch()
        assert share.rebalance() == 4  # within the interval: no registry read
        assert share.rebalance(force=True) == 2 and torch.get_num_threads() == 2
        other.kill()
        other.wait()
        assert share.rebalance(force=True) == 4
        share.leave()
        assert cores.live_jobs(tmp_path) == []
        fixed = cores.CoreShare(fixed=3, registry=tmp_path)
        (tmp_path / str(os.getpid())).touch()
        assert fixed.join() == 3 and torch.get_num_threads() == 3
    finally:
        other.kill()
        other.wait()
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


@pytest.mark.parametrize("threads", [0, 2])
def test_setup_joins_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    from pipeline.engine.context import setup
    from tests.tiny import tiny_params, write_params

    p = tiny_params()
    p["base"]["threads"] = threads
    monkeypatch.setattr(cores, "_current", None)
    monkeypatch.setenv(cores.REGISTRY_ENV, str(tmp_path / "jobs"))
    before = torch.get_num_threads()
    try:
        write_params(tmp_path, p)
        setup("warmup", tmp_path / "params.yaml")
        assert cores.live_jobs(tmp_path / "jobs") == [os.getpid()]
        assert torch.get_num_threads() == (threads or cores._current.cores)
    finally:
        cores._current.leave()
        torch.set_num_threads(before)
