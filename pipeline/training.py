"""Glue shared by every training stage: streams, evaluator, model export, metrics files, and the run call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline.config import ModelParams, OptimParams, StrongParams, ViewParams
from pipeline.engine import FitResult, Stream, Task, evaluate, fit
from pipeline.losses import cross_entropy
from pipeline.metrics import write_per_class_csv
from pipeline.models import source_bn_frozen
from pipeline.runtime import Context, dataset, save_model, write_json
from pipeline.views import StrongViewConfig, WeakViewConfig, make_weak_view


def weak_config(v: ViewParams) -> WeakViewConfig:
    return WeakViewConfig(crop_size=tuple(v.crop), scale_range=tuple(v.scale_range), hflip_p=v.hflip_p)


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


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)


def source_forward(net: nn.Module, src: dict, source_ce, target_bn: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Source CE from its own forward (BatchNorm statistics of one domain per forward, as the public code).

    With `target_bn`, the source batch is normalised with its own statistics but does not move the running
    ones, which then follow the target only (what evaluation and inference use).
    Returns the weighted term (an exact 0 when `source_ce.enabled` is false) and its log entry.
    """
    if not source_ce.enabled:
        return torch.zeros(()), {}
    with source_bn_frozen(net, target_bn):
        logits, _ = net(src["image"])
    ce = cross_entropy(logits, src["label"])
    return source_ce.weight * ce, {"src_ce": ce.item()}


def wrap_ddp(model: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.info.enabled:
        return model
    ids = [ctx.info.device.index] if ctx.info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def stream(ctx: Context, name: str, with_labels: bool, transform, batch_size: int, salt: int) -> Stream:
    ds = dataset(ctx, name, with_labels, transform)
    return Stream(ds, batch_size, ctx.params.base.seed + salt, ctx.info, ctx.params.data.num_workers)


def make_evaluator(ctx: Context):
    val = dataset(ctx, "target_val", with_labels=True)
    bs = ctx.params.evaluate.batch_size

    def _eval(model: nn.Module) -> dict:
        cm = evaluate(model, val, ctx.num_classes, ctx.info, bs)
        out = cm.summary(ctx.class_names)
        out["_iou"] = cm.iou()
        return out

    return _eval


def run_training(
    ctx: Context,
    task: Task,
    streams: dict[str, Stream],
    optim: OptimParams,
    mp: ModelParams,
    *,
    out_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    loss_names: list[str],
    inputs: list[Any],
) -> dict:
    """Trains `task`, writes ``out_dir/{last,best}.pt``, metrics JSON and curves/per-class CSVs (rank 0).

    Returns the metrics written (on every rank; only rank 0 writes files).
    """
    evaluator = make_evaluator(ctx)
    iou_last: dict[str, Any] = {}

    def export(kind: str, model: nn.Module, metrics: dict | None) -> None:
        m = {k: v for k, v in (metrics or {}).items() if not k.startswith("_")}
        if kind == "last":
            iou_last["iou"] = (metrics or {}).get("_iou")
        note = "final weights" if kind == "last" else "best on target val (optimistic: selected on the test set)"
        save_model(out_dir / f"{kind}.pt", model, ctx, mp, {"kind": kind, "note": note, "metrics": m})

    section = ctx.params.model_dump(mode="json").get(ctx.stage.split("@")[0], {})
    fp = ckpt.fingerprint(ctx.stage, section, ctx.params.model.model_dump(mode="json"), ctx.params.base.seed, inputs)
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
    }
    if ctx.info.is_main:
        write_json(metrics_path, metrics)
        if iou_last.get("iou") is not None:
            write_per_class_csv(plots_dir / "per_class.csv", ctx.class_names, iou_last["iou"])
    return metrics
