"""The one training loop every training stage uses.

Iteration-based (the poly schedule sees the true iteration count), gradient accumulation, bf16 autocast on
GPU, DDP, progress bar, CSV curves for ``dvc plots``, periodic target-val evaluation, last/best model files,
and exact resume: a killed run restarted by the same command continues from its resume state (models,
optimizers, EMA/prototypes, RNG, data position, iteration) and ends where an uninterrupted run would.
"""

from __future__ import annotations

import csv
import itertools
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import cores
from pipeline.config import OptimParams
from pipeline.data.datasets import index_seed
from pipeline.distributed import DistInfo, all_reduce_sum, barrier, bf16_native, unwrap
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.monitor import Monitor, StageCancelled
from pipeline.maths.metrics import ConfusionMatrix, class_argmax


# ------------------------------------------------------------------------------------------------ data
class EpochBatchSampler(torch.utils.data.Sampler):
    """One epoch of a seeded permutation, cut into global batches; each rank takes its slice of a batch.

    Yields ``(index, augmentation_seed)`` keys so augmentations depend on (seed, epoch, index) only.
    """

    def __init__(self, n: int, global_batch: int, seed: int, epoch: int, start: int, rank: int, world: int):
        if global_batch % world:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {world} DDP processes")
        if n < global_batch:
            raise ValueError(f"dataset of {n} images is smaller than one batch of {global_batch}")
        self.n, self.gb, self.seed, self.epoch, self.start = n, global_batch, seed, epoch, start
        self.rank, self.per = rank, global_batch // world

    def __len__(self) -> int:
        return self.n // self.gb - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.n // self.gb):
            chunk = perm[b * self.gb : (b + 1) * self.gb][self.rank * self.per : (self.rank + 1) * self.per]
            yield [(i, index_seed(self.seed, i, self.epoch)) for i in chunk]


class Stream:
    """An endless, resumable stream of batches from a dataset (position = epoch + batches consumed)."""

    def __init__(self, dataset, global_batch: int, seed: int, info: DistInfo, num_workers: int = 0):
        self.dataset, self.gb, self.seed, self.info, self.num_workers = (
            dataset,
            global_batch,
            seed,
            info,
            num_workers,
        )
        self.epoch, self.batch = 0, 0
        self._it: Iterator | None = None

    def _open(self) -> None:
        sampler = EpochBatchSampler(
            len(self.dataset),
            self.gb,
            self.seed,
            self.epoch,
            self.batch,
            self.info.rank,
            self.info.world_size,
        )
        # An own generator: otherwise each new iterator draws its worker base seed from the global RNG, and a
        # resumed run (which opens an extra iterator mid-epoch) would shift the dropout masks that follow.
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate, generator=gen
        )
        self._it = iter(loader)

    def next(self) -> dict:
        if self._it is None:
            self._open()
        try:
            out = next(self._it)
        except StopIteration:
            self.epoch, self.batch = self.epoch + 1, 0
            self._open()
            out = next(self._it)
        self.batch += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self._it = state["epoch"], state["batch"], None


def collate(samples: list[dict]) -> dict:
    """Stacks tensors, keeps lists of everything else (ids), and None stays None."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], dict):
            out[key] = collate(vals)
        else:
            out[key] = vals
    return out


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------------------- optimizer
def poly_factor(it: int, max_iters: int, power: float) -> float:
    """(1 - it/max)^power, clamped at 0 past the end (never a complex number)."""
    if max_iters <= 0:
        raise ValueError("max_iters must be positive")
    return max(0.0, 1.0 - it / max_iters) ** power


def lr_factor(it: int, p: OptimParams) -> float:
    """The lr multiplier at iteration ``it``: a linear ramp over ``warmup_iters`` (from 1/warmup_iters), then
    poly ``(1 - it/H)^power`` or half a cosine ``(1 + cos(pi it/H))/2`` over the horizon H (schedule_iters or
    iters), both counted from iteration 0 so that the ramp only scales the first steps down."""
    horizon = p.schedule_iters or p.iters
    if p.lr_policy == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(it, horizon) / horizon))
    else:
        f = poly_factor(it, horizon, p.poly_power)
    if it < p.warmup_iters:
        f *= (it + 1) / p.warmup_iters
    return f


def build_optimizer(groups: list[dict], p: OptimParams) -> torch.optim.Optimizer:
    for g in groups:
        g.setdefault("base_lr", g["lr"])
    # Fused kernels (CPU and CUDA): one pass over all parameters instead of a Python loop of small ops per
    # tensor (several times faster on CPU at the default's size), the same update rule.
    if p.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, fused=True)
    return torch.optim.Adam(groups, lr=p.lr, weight_decay=p.weight_decay, fused=True)


def apply_lr(opt: torch.optim.Optimizer, factor: float) -> float:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    return opt.param_groups[0]["lr"]


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Class logits of uint8 or [0,1] images, upsampled bilinearly to out_size (default: the input size)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    logits = model(x)[0]
    return F.interpolate(logits.float(), size=out_size or x.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, num_classes: int, info: DistInfo, batch_size: int = 4) -> ConfusionMatrix:
    """Confusion matrix over the whole split at label resolution; shards across DDP ranks, then reduces."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes)
    indices = list(range(info.rank, len(dataset), info.world_size))
    for start in range(0, len(indices), batch_size):
        cores.rebalance()
        samples = [dataset[i] for i in indices[start : start + batch_size]]
        # Consecutive samples of one image and label size form a batch (sizes may differ between images).
        for _, group in itertools.groupby(samples, key=lambda s: (s["image"].shape, s["label"].shape)):
            batch = collate(list(group))
            with autocast(info.device, True):
                logits = predict_logits(model, batch["image"].to(info.device), tuple(batch["label"].shape[-2:]))
            cm.update(class_argmax(logits).cpu(), batch["label"])
    if info.enabled:  # sharded: sum the ranks' counts (a single-rank DistInfo evaluates the whole split alone)
        counts = all_reduce_sum(torch.from_numpy(cm.counts).to(info.device if info.device.type == "cuda" else "cpu"))
        cm.counts = counts.cpu().numpy()
    model.train(was_training)
    return cm


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA and on CPU, where the device has native bf16 kernels (:func:`bf16_native`);
    fp32 elsewhere, so ``amp: true`` never makes a run slower.

    bf16 needs no loss scaling, so no GradScaler state exists to checkpoint.
    """
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and bf16_native(device.type))


# ------------------------------------------------------------------------------------------------ task
class Task(Protocol):
    """What a training stage provides to the loop."""

    def modules(self) -> dict[str, nn.Module]: ...  # checkpointed; "model" is the one evaluated and exported

    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def extras(self) -> dict[str, Any]: ...  # objects with state_dict/load_state_dict (EMA, prototypes)

    # Log terms: 0-d tensors (read on the host only at log intervals) or floats.
    def loss(self, batch: dict[str, dict], it: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]: ...

    def after_step(self, it: int) -> None: ...


@dataclass
class FitResult:
    final_metrics: dict
    best_metrics: dict | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    last_losses: dict = field(default_factory=dict)


class CurveWriter:
    """Appends rows to a CSV that ``dvc plots`` reads; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int) -> None:
        self.path, self.fields = path, ["step", *fields]
        rows = []
        if resume_step > 0 and path.is_file():
            with path.open() as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            w.writerow({"step": step, **{k: f"{v:.6g}" for k, v in values.items()}})


@dataclass
class _Progress:
    """Where a run stands: the iteration to start from, the best evaluation so far and the evaluation history."""

    start: int = 0
    best: dict | None = None
    history: list[dict] = field(default_factory=list)


def _resume(
    task: Task, streams: dict[str, Stream], info: DistInfo, path: Path, fingerprint: str, name: str
) -> _Progress:
    """Loads the resume state at ``path`` into the task and streams when it was written for these inputs."""
    if not path.is_file():
        return _Progress()
    st = ckpt.load(path)
    if st.get("fingerprint") != fingerprint or st.get("world_size") != info.world_size:
        if info.is_main:
            print(f"[{name}] ignoring resume state for other inputs: {path}", flush=True)
        return _Progress()
    for k, m in task.modules().items():
        unwrap(m).load_state_dict(st["modules"][k])
    for k, o in task.optimizers().items():
        o.load_state_dict(st["optimizers"][k])
    for k, e in task.extras().items():
        e.load_state_dict(st["extras"][k])
    for k, s in streams.items():
        s.load_state_dict(st["streams"][k])
    ckpt.set_rng_state(st["rng"][info.rank] if isinstance(st["rng"], list) else st["rng"])
    if info.is_main:
        print(f"[{name}] resuming from iteration {st['iteration']} ({path})", flush=True)
    return _Progress(st["iteration"], st.get("best"), st.get("history", []))


def _accumulate(
    task: Task, streams: dict[str, Stream], p: OptimParams, info: DistInfo, it: int
) -> tuple[dict[str, torch.Tensor | float], torch.Tensor, int]:
    """Forward and backward of ``p.accum_steps`` batches: the averaged log terms (``loss`` included), whether a
    loss was non-finite (a device tensor: no host sync), and the number of images seen."""
    logs_acc: dict[str, torch.Tensor | float] = {}
    bad: torch.Tensor | None = None
    images = 0
    for _ in range(p.accum_steps):
        batch = {k: to_device(s.next(), info.device) for k, s in streams.items()}
        with autocast(info.device, p.amp):
            loss, logs = task.loss(batch, it)
        now_bad = ~torch.isfinite(loss.detach())
        bad = now_bad if bad is None else bad | now_bad
        (loss / p.accum_steps).backward()
        for k, v in {**logs, "loss": loss.detach()}.items():
            logs_acc[k] = logs_acc.get(k, 0.0) + v / p.accum_steps
        images += sum(b["image"].shape[0] for b in batch.values())
    return logs_acc, bad, images


class _Reports:
    """Rank 0's view of the run: progress bar, monitor and the CSV curves ``dvc plots`` reads."""

    def __init__(
        self, name: str, p: OptimParams, info: DistInfo, monitor: Monitor, curves: Path, terms: list[str], start: int
    ) -> None:
        self.total, self.main, self.monitor = p.iters, info.is_main, monitor
        self.train = CurveWriter(curves / "train.csv", [*terms, "loss", "lr"], start) if self.main else None
        self.evals = CurveWriter(curves / "eval.csv", ["miou"], start) if self.main else None
        self.bar = tqdm(total=p.iters, initial=start, desc=name, disable=not self.main, dynamic_ncols=True)
        self.images, self.t_last = 0, time.time()
        monitor.start(name, p.iters, start)

    def step(self, step: int, logs: dict[str, float] | None, lr: float) -> None:
        """One finished step; ``logs`` (host floats) at a log interval, None otherwise."""
        if not self.main:
            return
        self.bar.update(1)
        if logs is None:
            return
        dt = max(time.time() - self.t_last, 1e-9)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()} | {"img/s": f"{self.images / dt:.1f}"})
        self.monitor.train_log(step, self.total, {**logs, "lr": lr, "img/s": self.images / dt})
        self.images, self.t_last = 0, time.time()
        self.train.write(step, {**logs, "lr": lr})

    def evaluation(self, step: int, metrics: dict) -> None:
        if self.main:
            self.monitor.eval_log(step, self.total, metrics)
            self.evals.write(step, {"miou": metrics["miou"]})

    def close(self, step: int) -> None:
        self.bar.close()
        self.monitor.finish(step, self.total)


def _check_finite(name: str, bad: bool, logs: dict, it: int, start: int, step: int, check_every: int) -> None:
    if not bad:
        return
    terms = {k: round(float(v), 4) for k, v in logs.items()}
    when = f"at iteration {it}"
    if check_every > 1:
        when += f" (non-finite first between iterations {max(start, step - check_every)} and {it})"
    raise FloatingPointError(f"[{name}] loss is {float(logs['loss'])} {when}: {terms}")


def fit(
    task: Task,
    streams: dict[str, Stream],
    p: OptimParams,
    info: DistInfo,
    *,
    name: str,
    resume_dir: Path,
    curves_dir: Path,
    fingerprint: str,
    evaluator: Callable[[nn.Module], dict] | None,
    loss_names: list[str],
    export: Callable[[str, nn.Module, dict | None], None],
    finalize: Callable[[nn.Module], None] | None = None,
    monitor: Monitor | None = None,
) -> FitResult:
    """Runs `p.iters` optimiser steps of `task`; writes model files via `export("last"|"best", model, metrics)`.

    `finalize`, if given, runs on the model after the last step, before its final evaluation and export.
    `monitor` receives progress, log lines and evaluations, and may ask the run to stop (a cancel).
    `fingerprint` identifies the run's inputs: resume state written for other inputs is discarded.
    """
    t0 = time.time()
    state_path = resume_dir / "state.pt"
    run = _resume(task, streams, info, state_path, fingerprint, name)
    mon = monitor or Monitor()
    reports = _Reports(name, p, info, mon, curves_dir, loss_names, run.start)
    for m in task.modules().values():
        m.train()
    model = task.modules()["model"]
    logs_sum: dict[str, float] = {}
    # Losses and log terms stay on the device between log intervals: no host sync per step on a GPU. A
    # non-finite loss is therefore caught at the next log interval (every step on the CPU, where it is free).
    check_every = 1 if info.device.type == "cpu" else p.log_every
    first_bad: torch.Tensor | None = None
    for it in range(run.start, p.iters):
        cores.rebalance()
        factor = lr_factor(it, p)
        for o in task.optimizers().values():
            apply_lr(o, factor)
        logs_acc, bad, images = _accumulate(task, streams, p, info, it)
        reports.images += images
        first_bad = bad if first_bad is None else first_bad | bad
        step = it + 1
        log_now = step % p.log_every == 0 or step == p.iters
        if step % check_every == 0 or log_now:
            _check_finite(name, bool(first_bad), logs_acc, it, run.start, step, check_every)
        if log_now:
            logs_sum = {k: float(v) for k, v in logs_acc.items()}  # the one host sync of a log interval
        for o in task.optimizers().values():
            o.step()
            o.zero_grad(set_to_none=True)
        task.after_step(it)
        first_lr = next(iter(task.optimizers().values())).param_groups[0]["lr"]
        reports.step(step, logs_sum if log_now else None, first_lr)
        if evaluator is not None and p.eval_every and step % p.eval_every == 0 and step < p.iters:
            metrics = evaluator(unwrap(model))
            run.history.append({"step": step, "miou": metrics["miou"]})
            reports.evaluation(step, metrics)
            if info.is_main and (run.best is None or metrics["miou"] > run.best["miou"]):
                run.best = {**metrics, "step": step}
                export("best", unwrap(model), run.best)
        saved = step % p.ckpt_every == 0 and step < p.iters
        if saved:
            _save_state(task, streams, info, state_path, fingerprint, step, run.best, run.history)
        if step < p.iters and _stop_requested(mon, info):
            # Cancelled: keep the work done so far as resume state, then stop (non-zero exit).
            if not saved:
                _save_state(task, streams, info, state_path, fingerprint, step, run.best, run.history)
            reports.close(step)
            raise StageCancelled(f"[{name}] cancelled at iteration {step}/{p.iters}; resume state kept in {state_path}")
    reports.bar.close()
    if finalize is not None:
        finalize(unwrap(model))
    final = evaluator(unwrap(model)) if evaluator is not None else {}
    if info.is_main:
        if final:
            reports.evaluation(p.iters, final)
            run.history.append({"step": p.iters, "miou": final["miou"]})
        if run.best is None or (final and final["miou"] >= run.best["miou"]):
            run.best = {**final, "step": p.iters} if final else None
            export("best", unwrap(model), run.best)
        export("last", unwrap(model), final)
    mon.finish(p.iters, p.iters)
    barrier()
    if info.is_main and resume_dir.exists():
        shutil.rmtree(resume_dir)  # finished: resume state would only be stale from now on
    return FitResult(
        final, run.best, run.history, time.time() - t0, run.start, {k: round(v, 6) for k, v in logs_sum.items()}
    )


def _stop_requested(mon: Monitor, info: DistInfo) -> bool:
    """Whether to stop at this step boundary; under DDP rank 0 decides for all ranks (one scalar all-reduce)."""
    stop = mon.stop_requested()
    if not info.enabled:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=info.device if info.device.type == "cuda" else "cpu")
    return bool(all_reduce_sum(flag).item() > 0)


def _save_state(task, streams, info, path, fingerprint, step, best, history) -> None:
    rng = ckpt.rng_state()
    if info.enabled:
        gathered: list = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if info.is_main:
        ckpt.save_atomic(
            {
                "fingerprint": fingerprint,
                "world_size": info.world_size,
                "iteration": step,
                "modules": {k: unwrap(m).state_dict() for k, m in task.modules().items()},
                "optimizers": {k: o.state_dict() for k, o in task.optimizers().items()},
                "extras": {k: e.state_dict() for k, e in task.extras().items()},
                "streams": {k: s.state_dict() for k, s in streams.items()},
                "rng": rng,
                # Evaluation metrics carry numpy arrays (per-class IoU): stored as tensors, loadable on resume.
                "best": ckpt.loadable(best),
                "history": ckpt.loadable(history),
            },
            path,
        )
    barrier()
