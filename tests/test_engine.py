"""The training engine (pipeline.engine.loop) through the real warm-up stage: exact resume after SIGKILL, stale
resume state, 2-process gloo DDP under torchrun, plus unit tests of the sampler and the resumable stream.

The process tests run ``python -m stages.warmup`` (as dvc.yaml does) in copies of one workspace whose
``generate`` and ``prepare`` stages ran once for the module. Most of the time is process start-up (torch and
torchvision imports), so the number of processes is kept small and fixtures share runs between tests.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_params
from pipeline.data.datasets import index_seed
from pipeline.distributed import DistInfo
from pipeline.engine.loop import EpochBatchSampler, Stream
from tests.tiny import stage, stage_argv, tiny_params, workspace, write_params

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ITERS = 40  # long enough that the kill lands well before the end; a step is ~50 ms on one CPU core
# Default model (dropout and trainable BatchNorm on): resume must restore RNG, BN buffers, momentum, data position.
RESUME = tiny_params(**{"warmup.optim.iters": ITERS, "warmup.optim.ckpt_every": 2})
# DDP equivalence: per-rank BN statistics and per-rank dropout masks differ from one process by design.
# The training loop alone: no BatchNorm re-estimation after it (it would amplify 1e-4 weight differences).
EQUIV = tiny_params(
    **{
        "warmup.optim.iters": 8,
        "warmup.optim.ckpt_every": 2,
        "warmup.target_bn": False,
        "warmup.freeze_bn": True,
        "model.dropout": 0.0,
    }
)
STATE = Path(".resume/warmup/state.pt")
LAST = Path("models/warmup/last.pt")
OUTPUTS = ("models", "metrics", "plots", ".resume")


# -------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def data_ws(tmp_path_factory) -> Path:
    """A workspace with data/embedded and data/manifests written by the real generate + prepare stages
    (both in one interpreter: start-up, not the stages, is what costs here)."""
    root = workspace(tmp_path_factory.mktemp("engine") / "data", tiny_params())
    argvs = [stage_argv(s, root)[2:] for s in ("generate", "prepare")]  # [module, args...] after "-m"
    loop = "for argv in ARGVS:\n    sys.argv = argv\n    runpy.run_module(argv[0], run_name='__main__')"
    code = f"import runpy, sys\nARGVS = {argvs!r}\n{loop}"
    run_ok([sys.executable, "-c", code], root)
    assert (root / "data/manifests/source.json").is_file()
    return root


def clone(data_ws: Path, dest: Path, params: dict) -> Path:
    """A copy of the data workspace (code, data, manifests, bytecode) with its own params and no outputs."""
    shutil.copytree(data_ws, dest, ignore=shutil.ignore_patterns(*OUTPUTS))
    write_params(dest, params)
    return dest


def weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / LAST, map_location="cpu", weights_only=True)["model"]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


def state_iteration(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return None  # not written yet (the save is atomic, so a present file is complete)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args]


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (torchrun starts its workers in new sessions, so killpg would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_when_saved(cmd: list[str], root: Path, min_iteration: int, iters: int, timeout: float = 120) -> int:
    """Starts `cmd` in `root`, SIGKILLs it (and every process it started) once its resume state records
    `min_iteration` or later; returns the iteration of the state left on disk."""
    log = (root.parent / f"{root.name}.killed.log").open("w")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(cmd, cwd=root, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            it = state_iteration(root / STATE) if (root / STATE).is_file() else None
            if it is not None and it >= min_iteration:
                break
            if proc.poll() is not None:
                log.close()
                out = Path(log.name).read_text()[-3000:]
                pytest.fail(f"{cmd} ended (rc {proc.returncode}) before it could be killed:\n{out}")
            if time.monotonic() > deadline:
                pytest.fail(f"no resume state at iteration >= {min_iteration} after {timeout} s")
            time.sleep(0.01)
        victims = [proc.pid, *descendants(proc.pid)]
        for pid in victims:  # the launcher first, so it cannot react to its workers dying
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        gone_by = time.monotonic() + 30
        for pid in victims[1:]:  # reaped by init once orphaned; wait until they are really gone
            while Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid) and time.monotonic() < gone_by:
                time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    final = state_iteration(root / STATE)
    assert final is not None and min_iteration <= final < iters
    return final


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def run_ok(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def train_rows(root: Path) -> list[dict[str, str]]:
    with (root / "plots/warmup/train.csv").open() as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- resume in one process
@pytest.fixture(scope="module")
def uninterrupted(data_ws, tmp_path_factory) -> Path:
    root = clone(data_ws, tmp_path_factory.mktemp("engine") / "A", RESUME)
    stage("warmup", root, env=ENV)
    return root


@pytest.fixture(scope="module")
def killed(data_ws, tmp_path_factory) -> tuple[Path, int, Path]:
    """A run SIGKILLed after its resume state reached iteration >= 4: (workspace, state iteration, state copy)."""
    base = tmp_path_factory.mktemp("engine")
    root = clone(data_ws, base / "B", RESUME)
    it = kill_when_saved(stage_argv("warmup", root), root, 4, ITERS)
    saved = base / "killed_state.pt"
    shutil.copy(root / STATE, saved)
    return root, it, saved


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(uninterrupted, killed):
    root, it, _ = killed
    assert not (root / LAST).exists(), "a killed run must not leave final model files"
    res = stage("warmup", root, env=ENV)
    assert f"resuming from iteration {it}" in res.stdout, res.stdout
    assert not (root / STATE.parent).exists(), "a finished run removes its resume state"
    a, b = weights(uninterrupted), weights(root)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, (
        f"resumed weights differ from the uninterrupted run (max |diff| {max_abs_diff(a, b):.3g}): {bad[:5]}"
    )
    # The curve of the resumed run is the uninterrupted one: steps 1..ITERS once each, same losses.
    rows_a, rows_b = train_rows(uninterrupted), train_rows(root)
    assert [int(r["step"]) for r in rows_b] == list(range(1, ITERS + 1))
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows_a]


@pytest.fixture(scope="module")
def single_equiv(data_ws, killed, tmp_path_factory) -> tuple[Path, str]:
    """The one-process reference for the DDP test (EQUIV params), started on top of the killed run's resume
    state, which was written for other params (lr aside, iters/dropout/freeze_bn differ): (workspace, stdout)."""
    _, _, saved = killed
    root = clone(data_ws, tmp_path_factory.mktemp("engine") / "single", EQUIV)
    (root / STATE).parent.mkdir(parents=True)
    shutil.copy(saved, root / STATE)
    return root, stage("warmup", root, env=ENV).stdout


@pytest.mark.slow
def test_resume_state_for_other_params_is_ignored(single_equiv):
    root, stdout = single_equiv
    assert "ignoring resume state for other inputs" in stdout, stdout
    assert "resuming" not in stdout
    # Started at iteration 0: no earlier curve exists in this workspace, so a resumed run would log only the
    # steps after the resume point. (That it also started from a fresh model, not the stale weights, is shown
    # by the DDP test, whose fresh 2-process run this run's weights match.)
    assert [int(r["step"]) for r in train_rows(root)] == list(range(1, EQUIV["warmup"]["optim"]["iters"] + 1))
    assert (root / LAST).is_file() and not (root / STATE.parent).exists()


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_two_processes_match_one_process_and_only_rank0_writes(data_ws, single_equiv, tmp_path):
    single, _ = single_equiv
    # Each rank runs in its own copy of the workspace, so a write by rank 1 would show up in r1/.
    r0, r1 = clone(data_ws, tmp_path / "r0", EQUIV), clone(data_ws, tmp_path / "r1", EQUIV)
    res = run_ok(
        torchrun(
            "--no-python", "bash", "-c", f'cd "{tmp_path}/r$LOCAL_RANK" && exec {shlex.join(stage_argv("warmup", r0))}'
        ),
        r0,
    )
    assert "resuming" not in res.stdout + res.stderr
    for name in OUTPUTS:
        assert not (r1 / name).exists(), f"rank 1 wrote {name}/"
    assert (r0 / LAST).is_file() and (r0 / "models/warmup/best.pt").is_file()
    assert (r0 / "metrics/warmup.json").is_file() and (r0 / "plots/warmup/train.csv").is_file()
    assert not (r0 / STATE.parent).exists()
    diff = max_abs_diff(weights(single), weights(r0))
    print(f"DDP (2 x 1 image) vs one process (batch 2), 8 iterations: max |weight diff| = {diff:.3g}")
    # Not bit-identical: the CE is averaged over each rank's valid pixels and DDP averages the ranks, while
    # one process averages over all valid pixels (crops padded with ignore pixels differ in valid counts).
    assert diff < 1e-3


@pytest.mark.slow
def test_ddp_with_trainable_bn_resumes_after_sigkill(data_ws, tmp_path):
    """DDP with BatchNorm in training mode runs; its resume state (per-rank RNG) is loaded by a DDP rerun."""
    iters = 12
    params = tiny_params(**{"warmup.optim.iters": iters, "warmup.optim.ckpt_every": 2})
    root = clone(data_ws, tmp_path / "ddp", params)
    cmd = torchrun(*stage_argv("warmup", root)[1:])
    it = kill_when_saved(cmd, root, 2, iters)
    st = torch.load(root / STATE, map_location="cpu", weights_only=True)
    assert st["world_size"] == 2 and isinstance(st["rng"], list) and len(st["rng"]) == 2
    assert not (root / LAST).exists()
    res = run_ok(cmd, root)
    assert f"resuming from iteration {it}" in res.stdout, res.stdout + res.stderr[-3000:]
    assert (root / LAST).is_file() and not (root / STATE.parent).exists()
    assert [int(r["step"]) for r in train_rows(root)] == list(range(1, iters + 1))


# ----------------------------------------------------------------------------------------------- units
def _batches(n, gb, seed, epoch, start=0, rank=0, world=1) -> list[list[tuple[int, int]]]:
    return list(EpochBatchSampler(n, gb, seed, epoch, start, rank, world))


def test_epoch_batch_sampler_slices_global_batches_across_ranks():
    n, gb, seed = 11, 4, 3
    for epoch in (0, 1):
        full = _batches(n, gb, seed, epoch)
        assert len(full) == n // gb == len(EpochBatchSampler(n, gb, seed, epoch, 0, 0, 1))
        assert all(len(b) == gb for b in full)
        idx = [i for b in full for i, _ in b]
        assert len(set(idx)) == len(idx) and set(idx) <= set(range(n))
        assert all(s == index_seed(seed, i, epoch) for b in full for i, s in b)
        r0, r1 = _batches(n, gb, seed, epoch, rank=0, world=2), _batches(n, gb, seed, epoch, rank=1, world=2)
        assert [a + b for a, b in zip(r0, r1, strict=True)] == full
        assert all(len(b) == gb // 2 for b in r0 + r1)
        # `start` skips whole global batches, on every rank.
        assert _batches(n, gb, seed, epoch, start=1) == full[1:]
        assert _batches(n, gb, seed, epoch, start=1, rank=1, world=2) == r1[1:]
        assert len(EpochBatchSampler(n, gb, seed, epoch, 1, 0, 2)) == n // gb - 1
    e0, e1 = _batches(n, gb, seed, 0), _batches(n, gb, seed, 1)
    assert [i for b in e0 for i, _ in b] != [i for b in e1 for i, _ in b]  # a new permutation each epoch
    seeds0 = {i: s for b in e0 for i, s in b}
    seeds1 = {i: s for b in e1 for i, s in b}
    assert all(seeds0[i] != seeds1[i] for i in seeds0.keys() & seeds1.keys())  # new augmentations too
    assert _batches(n, gb, seed, 0) == e0 and _batches(n, gb, seed + 1, 0) != e0
    with pytest.raises(ValueError, match="not divisible"):
        EpochBatchSampler(n, 3, seed, 0, 0, 0, 2)
    with pytest.raises(ValueError, match="smaller than one batch"):
        EpochBatchSampler(3, 4, seed, 0, 0, 0, 1)


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose sample is its own key, so a batch shows which (index, seed) keys it came from."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, s = key
        return {"image": torch.tensor([i]), "seed": s}


def test_stream_resumes_at_its_position_and_leaves_global_rng_alone():
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    ref = Stream(_Indexed(), 2, 5, info)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    batches, states = [], []
    for _ in range(8):  # 3 batches an epoch: crosses two epoch boundaries
        states.append(ref.state_dict())
        batches.append(ref.next())
    # Opening a DataLoader iterator (each epoch, and again on resume) must not draw from the global RNG,
    # or a resumed run would see different dropout masks than an uninterrupted one.
    assert torch.equal(torch.get_rng_state(), rng_before)
    positions = [(s["epoch"], s["batch"]) for s in states]
    assert positions == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1)]
    for k in (1, 3, 4, 6):
        resumed = Stream(_Indexed(), 2, 5, info)
        resumed.load_state_dict(states[k])
        for want in batches[k:]:
            got = resumed.next()
            assert torch.equal(got["image"], want["image"]) and got["seed"] == want["seed"]


def test_stream_batches_do_not_depend_on_worker_processes(tmp_path: Path):
    # `data.num_workers` only moves loading out of the training process (the default is 0, faster on 2 cores):
    # stage 1's target views (random crops, flips, strong photometric augmentation) come out the same, bit for
    # bit and across epoch boundaries, when a worker process draws them.
    import numpy as np
    from PIL import Image

    from pipeline.config import parse_params
    from pipeline.data.datasets import Record, SegDataset
    from pipeline.methods.self_training import TargetViews

    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        path = tmp_path / f"t{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(path)
        records.append(Record(f"t{i}", str(path), None))
    p = parse_params(tiny_params()).adapt
    ds = SegDataset(records, None, None, TargetViews(p.view, p.strong, None))
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    inline, worker = Stream(ds, 2, 5, info, num_workers=0), Stream(ds, 2, 5, info, num_workers=1)
    for _ in range(5):  # 2 batches an epoch
        a, b = inline.next(), worker.next()
        assert a.keys() == b.keys() and any(isinstance(v, torch.Tensor) for v in a.values())
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), key
    assert inline.state_dict() == worker.state_dict() == {"epoch": 2, "batch": 1}


def test_poly_schedule_values() -> None:
    from pipeline.engine.loop import apply_lr, lr_factor, poly_factor

    assert poly_factor(0, 100, 0.9) == pytest.approx(1.0)
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_factor(100, 100, 0.9) == 0.0
    beyond = poly_factor(150, 100, 0.9)  # the public code went complex past the end
    assert beyond == 0.0 and isinstance(beyond, float)
    with pytest.raises(ValueError, match="max_iters must be positive"):
        poly_factor(0, 0, 0.9)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(
        [{"params": [w], "lr": 2.5e-4, "base_lr": 2.5e-4}, {"params": [], "lr": 2.5e-3, "base_lr": 2.5e-3}]
    )
    p = load_params(PARAMS).warmup.optim.model_copy(update={"iters": 100, "poly_power": 0.9})
    apply_lr(opt, lr_factor(50, p))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4 * 0.5**0.9, 2.5e-3 * 0.5**0.9])


def test_cosine_schedule_and_linear_ramp() -> None:
    from pipeline.engine.loop import lr_factor

    base = load_params(PARAMS).warmup.optim
    cos = base.model_copy(update={"iters": 100, "schedule_iters": 200, "lr_policy": "cosine", "warmup_iters": 0})
    assert lr_factor(0, cos) == pytest.approx(1.0)
    assert lr_factor(100, cos) == pytest.approx(0.5)  # half the horizon: (1 + cos(pi/2)) / 2
    assert lr_factor(150, cos) == pytest.approx((1 + math.cos(0.75 * math.pi)) / 2)
    ramp = cos.model_copy(update={"warmup_iters": 4})
    # Steps 0..3 scale the schedule by 1/4, 2/4, 3/4, 4/4; from step 4 on the schedule alone.
    assert lr_factor(0, ramp) == pytest.approx(0.25 * lr_factor(0, cos))
    assert lr_factor(2, ramp) == pytest.approx(0.75 * lr_factor(2, cos))
    assert lr_factor(4, ramp) == pytest.approx(lr_factor(4, cos))
    with pytest.raises(ValueError, match="warmup_iters: 100 is not below iters 100"):
        type(base).model_validate({**base.model_dump(), "iters": 100, "warmup_iters": 100})


def _x86_cpu_flags() -> set[str] | None:
    """The CPU flags of an x86 Linux machine, None elsewhere."""
    info = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not info.exists():
        return None
    m = re.search(r"^flags\s*:(.*)$", info.read_text(), re.M)
    return set(m.group(1).split()) if m else None


def test_amp_autocasts_to_bf16_only_where_the_cpu_runs_it_natively() -> None:
    from pipeline.distributed import bf16_native
    from pipeline.engine.loop import autocast

    cpu = torch.device("cpu")
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with autocast(cpu, True):
        on = layer(x)
    with autocast(cpu, False):
        off = layer(x)
    assert on.dtype == (torch.bfloat16 if bf16_native("cpu") else torch.float32)
    assert off.dtype == torch.float32
    flags = _x86_cpu_flags()
    if flags is not None:
        # Emulated bf16 on an AVX2-only CPU was ~500x slower than fp32 (a 2048² matmul: 57 s vs 0.10 s).
        if not flags & {"avx512bw", "avx512_bf16", "amx_bf16", "avx_ne_convert"}:
            assert not bf16_native("cpu")
        if {"avx512_bf16", "amx_bf16"} & flags:
            assert bf16_native("cpu")
