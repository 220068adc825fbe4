"""Glue shared by every training stage: streams, evaluator, model export, metrics files, and the run call."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelParams, OptimParams, PreciseBNParams, StrongParams, ViewParams
from pipeline.data.views import StrongViewConfig, WeakViewConfig, make_weak_view
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.context import Context, Data, save_model
from pipeline.engine.loop import FitResult, Stream, Task, evaluate, fit
from pipeline.engine.terms import Losses, Term
from pipeline.files import write_json
from pipeline.maths.losses import cross_entropy
from pipeline.maths.metrics import write_per_class_csv
from pipeline.models import batchnorms, estimate_bn_stats, source_bn_frozen


def weak_config(v: ViewParams) -> WeakViewConfig:
    return WeakViewConfig(
        crop_size=tuple(v.crop), scale_range=tuple(v.scale_range), hflip_p=v.hflip_p, base_width=v.base_width
    )


def strong_config(s: StrongParams) -> StrongViewConfig:
    return StrongViewConfig(
        num_ops=s.num_ops,
        magnitude_range=tuple(s.magnitude_range),
        op_p=s.op_p,
        cutout=s.cutout,
        cutout_frac=s.cutout_frac,
        hflip_p=s.hflip_p,
    )


class WeakTransform:
    """Dataset transform: one weak view (rescale, crop, flip) of image and label; picklable for workers."""

    def __init__(self, view: ViewParams) -> None:
        self.cfg = weak_config(view)

    def __call__(self, sample: dict, gen: torch.Generator) -> dict:
        v = make_weak_view(sample["image"], sample.get("label"), self.cfg, gen)
        out = {"index": sample["index"], "image": v.image, "valid": v.valid}
        if v.label is not None:
            out["label"] = v.label
        return out


def target_size(crop: torch.Size | tuple[int, int], scale: float) -> tuple[int, int]:
    """Size at which target-side terms are computed: `scale` of the crop (the paper: 1/4 of 896x512)."""
    return (max(1, round(crop[0] * scale)), max(1, round(crop[1] * scale)))


#: The source term every adapting stage shares (``<section>.source_ce: {enabled, weight}``).
SOURCE_CE = Term("source_ce", "cross-entropy on a weak view of the labelled source, in a forward of its own")


def source_forward(net: nn.Module, src: dict, losses: Losses, target_bn: bool) -> None:
    """Adds the source CE to ``losses`` from its own forward (BatchNorm statistics of one domain per forward,
    as the public code); nothing when the params switch it off.

    With `target_bn`, the source batch is normalised with its own statistics but does not move the running
    ones, which then follow the target only (what evaluation and inference use).
    """
    if not losses.on(SOURCE_CE):
        return
    with source_bn_frozen(net, target_bn):
        logits, _ = net(src["image"])
    losses.add(SOURCE_CE, cross_entropy(logits, src["label"]))


def sync_batchnorm(model: nn.Module, ctx: Context) -> nn.Module:
    """``model`` with SyncBatchNorm layers where its BatchNorm trains under DDP on CUDA and ``base.sync_bn``
    asks for it (the public code's sync_bn: the paper's batch 4 over 4 GPUs is one image per process). Layers
    are replaced in place, so references to ``model`` stay valid. Elsewhere (one process, CPU/gloo, frozen BN)
    the model is returned unchanged: on CPU each process normalises with its own batch."""
    trains_bn = not getattr(model, "freeze_bn", False) and bool(batchnorms(model))
    if ctx.sync_bn and ctx.info.enabled and ctx.info.device.type == "cuda" and trains_bn:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_ddp(model: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.info.enabled:
        return model
    model = sync_batchnorm(model, ctx)
    ids = [ctx.info.device.index] if ctx.info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@dataclass(frozen=True)
class TrainOutputs:
    """Where a training stage writes (dvc.yaml passes each path on the stage's command line)."""

    models: Path  # folder: last.pt, best.pt (+ whatever the method adds)
    metrics: Path  # JSON
    plots: Path  # folder: train.csv, eval.csv, per_class.csv


def stream(ctx: Context, data: Data, name: str, with_labels: bool, transform, batch_size: int, salt: int) -> Stream:
    ds = data.dataset(name, with_labels, transform)
    return Stream(ds, batch_size, ctx.seed + salt, ctx.info, data.num_workers)


def make_evaluator(ctx: Context, data: Data, batch_size: int):
    """mIoU on target val (all DDP ranks take part), as every training stage evaluates."""
    val = data.dataset("target_val", with_labels=True)

    def _eval(model: nn.Module) -> dict:
        cm = evaluate(model, val, ctx.num_classes, ctx.info, batch_size)
        out = cm.summary(ctx.class_names)
        out["_iou"] = cm.iou()
        return out

    return _eval


def target_train_images(
    ctx: Context, data: Data, batch_size: int, max_images: int | None = None
) -> Iterator[torch.Tensor]:
    """Clean target train images (read as every stage reads them, no augmentation), in order, as float batches
    in [0, 1] on the stage's device; the first ``max_images`` when given."""
    tgt = data.dataset("target_train", with_labels=False)
    n = len(tgt) if max_images is None else min(len(tgt), max_images)
    for start in range(0, n, batch_size):
        imgs = torch.stack([tgt.load(i)["image"] for i in range(start, min(start + batch_size, n))])
        yield imgs.to(ctx.info.device).float() / 255.0


def precise_bn(ctx: Context, data: Data, p: PreciseBNParams, batch_size: int) -> Callable[[nn.Module], None] | None:
    """The `fit` finaliser that re-estimates BatchNorm statistics on clean target train images, or None.

    Every rank reads the same images, so DDP replicas end with the same statistics."""
    if not p.enabled:
        return None

    def finalize(model: nn.Module) -> None:
        n = estimate_bn_stats(model, target_train_images(ctx, data, batch_size, p.max_images))
        if ctx.info.is_main:
            print(f"[{ctx.stage}] precise BN: BatchNorm statistics re-estimated on {n} target train images", flush=True)

    return finalize


def run_training(
    ctx: Context,
    task: Task,
    streams: dict[str, Stream],
    optim: OptimParams,
    mp: ModelParams,
    *,
    evaluator,
    out: TrainOutputs,
    loss_names: list[str],
    section: dict[str, Any],
    inputs: list[Any],
    finalize: Callable[[nn.Module], None] | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> dict:
    """Trains `task`, writes ``out.models/{last,best}.pt``, metrics JSON and curves/per-class CSVs (rank 0).

    ``finalize`` runs on the model after the last step, before its final evaluation (e.g. `precise_bn`).

    ``section`` (the stage's params, as JSON) and ``inputs`` (hashes of the input files) fingerprint the
    resume state, so a change of either never resumes stale state. Returns the metrics written (on every
    rank; only rank 0 writes files).
    """
    out_dir, metrics_path, plots_dir = out.models, out.metrics, out.plots
    iou_last: dict[str, Any] = {}

    def export(kind: str, model: nn.Module, metrics: dict | None) -> None:
        m = {k: v for k, v in (metrics or {}).items() if not k.startswith("_")}
        if kind == "last":
            iou_last["iou"] = (metrics or {}).get("_iou")
        note = "final weights" if kind == "last" else "best on target val (optimistic: selected on the test set)"
        save_model(out_dir / f"{kind}.pt", model, ctx, mp, {"kind": kind, "note": note, "metrics": m})

    fp = ckpt.fingerprint(ctx.stage, section, mp.model_dump(mode="json"), ctx.seed, inputs)
    res: FitResult = ctx.step(
        "train",
        fit,
        task,
        streams,
        optim,
        ctx.info,
        name=ctx.stage,
        resume_dir=Path(".resume") / ctx.stage.replace("@", "_"),
        curves_dir=plots_dir,
        fingerprint=fp,
        evaluator=evaluator,
        loss_names=loss_names,
        export=export,
        finalize=finalize,
        monitor=ctx.monitor,
    )
    clean = lambda d: {k: v for k, v in (d or {}).items() if not k.startswith("_")}  # noqa: E731
    final = clean(res.final_metrics)
    metrics = {
        "miou": final.get("miou"),
        "pixel_acc": final.get("pixel_acc"),
        "per_class_iou": final.get("per_class_iou"),
        "best": {"miou": clean(res.best_metrics).get("miou"), "step": clean(res.best_metrics).get("step")},
        "iters": optim.iters,
        "train_seconds": round(res.seconds, 2),
        "resumed_from": res.resumed_from,
        "final_losses": res.last_losses,
        **(extra_metrics or {}),
    }
    if ctx.info.is_main:
        write_json(metrics_path, metrics)
        if iou_last.get("iou") is not None:
            write_per_class_csv(plots_dir / "per_class.csv", ctx.class_names, iou_last["iou"])
    return metrics


def write_skipped(out: TrainOutputs, reason: str, is_main: bool = True) -> dict:
    """Outputs of a training stage switched off by its params: the model and plot folders hold only
    ``skipped.json`` (stale files of an earlier run are removed) and the metrics file says why."""
    note = {"skipped": reason}
    if is_main:
        for folder in (out.models, out.plots):
            if folder.exists():
                shutil.rmtree(folder)
            write_json(folder / "skipped.json", note)
        write_json(out.metrics, note)
    return note
