"""The `evaluate` stage's measurements: one report of the whole run (``pipeline.report.render`` writes it out).

Every stage's final model is re-evaluated here on target val, so the table never depends on numbers other
stages wrote. The source-only model is the baseline: gap closed = 100 · (mIoU − source-only mIoU) / (oracle mIoU −
source-only mIoU), in percent like every other number of the report. ``best.pt`` (selected on target val itself)
is measured too and labelled optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.datasets import SegDataset
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.context import Context, Data, load_model
from pipeline.engine.loop import evaluate, predict_logits
from pipeline.maths.metrics import ConfusionMatrix, class_argmax
from pipeline.maths.selection import ClassBalanced
from pipeline.methods.pseudo_labels import gt_loader
from pipeline.methods.rounds import kept_labels
from pipeline.store.pseudo_store import PseudoLabelStore
from pipeline.store.quality import evaluate_store_quality

WARMUP, ORACLE, ADAPT, SOURCE_ONLY = "warmup", "oracle", "adapt", "source_only"
LABELS = {
    SOURCE_ONLY: "source only",
    WARMUP: "warm-up",
    ORACLE: "oracle (target labels)",
    ADAPT: "adapt (ProDA stage 1)",
}


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class StageModel:
    name: str  # key in the report (``distill_1``)
    dvc_stage: str  # the dvc.yaml stage that writes it (``distill@1``), for error messages
    dir: Path
    file: str = "last.pt"  # the model evaluated
    best_file: str | None = "best.pt"  # its best-on-val companion, if the stage writes one

    @property
    def last(self) -> Path:
        return self.dir / self.file

    @property
    def best(self) -> Path | None:
        return None if self.best_file is None else self.dir / self.best_file


@dataclass(frozen=True)
class PseudoStore:
    name: str  # ``warmup`` / ``teacher_<r>``
    dvc_stage: str
    path: Path
    threshold: float
    # Per-class thresholds made from the store itself (a class-balanced round): called once the store exists.
    selection: Callable[[], ClassBalanced] | None = None


def check_inputs(models: Sequence[StageModel], stores: Sequence[PseudoStore]) -> None:
    """Fails before any evaluation when an input is missing, naming the file and the stage that makes it."""
    for m in models:
        if not m.last.is_file():
            raise CheckpointError(f"model of stage '{m.dvc_stage}' not found: {m.last} (run `dvc repro {m.dvc_stage}`)")
    for s in stores:
        if not s.path.exists():
            raise FileNotFoundError(
                f"pseudo labels of stage '{s.dvc_stage}' not found: {s.path} (run `dvc repro {s.dvc_stage}`)"
            )


def load_stage_model(m: StageModel, path: Path, ctx: Context) -> torch.nn.Module:
    try:
        return load_model(path, ctx)
    except CheckpointError as err:
        raise CheckpointError(f"model of stage '{m.dvc_stage}': {err}") from None


# ----------------------------------------------------------------------------------------- evaluation
@dataclass
class StageResult:
    cm: ConfusionMatrix
    summary: dict[str, Any]  # ConfusionMatrix.summary: miou, pixel_acc (%), per_class_iou
    best_miou: float | None = None  # mIoU of best.pt (optimistic: selected on target val)
    best_is_last: bool = False
    overlay_preds: list[np.ndarray] = field(default_factory=list)


@dataclass
class Report:
    stages: dict[str, StageResult]
    gap_closed: dict[str, float | None]
    pseudo_labels: dict[str, dict[str, Any]]
    final_stage: str
    class_names: list[str]
    num_val_images: int
    overlay_ids: list[str]
    overlay_images: list[np.ndarray]  # uint8 [H, W, 3]
    overlay_labels: list[np.ndarray]  # train ids [H, W]
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """The compact, diffable metrics JSON (mIoU, accuracy, coverage and gap closed: all in %)."""
        return {
            "stages": {
                n: {k: _json_num(r.summary[k]) for k in ("miou", "miou_13", "pixel_acc") if k in r.summary}
                for n, r in self.stages.items()
            },
            "gap_closed": self.gap_closed,
            "pseudo_labels": {
                n: {
                    **{k: _json_num(q[k]) for k in ("threshold", "coverage", "pixel_acc", "miou")},
                    **({"selection": q["selection"]} if "selection" in q else {}),
                }
                for n, q in self.pseudo_labels.items()
            },
            "final_stage": self.final_stage,
        }


def _json_num(x: float | None) -> float | None:
    # NaN (e.g. an empty split) is not valid JSON for dvc; null is.
    return None if x is None or not math.isfinite(x) else x


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def gap_closed(mious: dict[str, float], adapted: Sequence[str]) -> tuple[dict[str, float | None], list[str]]:
    """100 · (mIoU − baseline) / (oracle − baseline) per adapted stage, in percent; None where undefined (+ a note),
    nothing without an oracle row (+ a note).

    The baseline is the source-only model: ``source_only`` when the warm-up saw target images, else the warm-up.
    """
    w, o = mious.get(SOURCE_ONLY, mious.get(WARMUP)), mious.get(ORACLE)
    if ORACLE not in mious:
        return {}, ["gap closed is not computed: the run has no oracle (oracle.enabled)"]
    if not (_finite(w) and _finite(o)) or o <= w:
        note = (
            f"gap closed is undefined: the oracle mIoU ({o}) is not above the warm-up (source-only) mIoU ({w}), "
            "so there is no gap to close"
        )
        return {n: None for n in adapted}, [note]
    # Percent, as mIoU: one unit in dvc metrics, the report, the summary and the benchmarks.
    return {n: (round(100.0 * (mious[n] - w) / (o - w), 2) if _finite(mious[n]) else None) for n in adapted}, []


def overlay_indices(val: SegDataset, n: int) -> list[int]:
    """The first ``n`` val images by sorted id (deterministic whatever the manifest order)."""
    return sorted(range(len(val)), key=lambda i: val.records[i].id)[:n]


@torch.no_grad()
def predict_labels(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    device: torch.device,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[np.ndarray]:
    """Argmax train ids [H, W] of uint8 [3, H, W] images (one at a time: sizes may differ), at ``sizes``
    (each image's own size by default)."""
    model.eval()

    def label(img: torch.Tensor, size: tuple[int, int] | None) -> np.ndarray:
        return class_argmax(predict_logits(model, img[None].to(device), size))[0].cpu().numpy().astype(np.uint8)

    return [label(img, None if sizes is None else tuple(sizes[i])) for i, img in enumerate(images)]


def image_at(image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A uint8 [3, h, w] image as [H, W, 3] at ``size`` (bilinear), to draw it under a label of that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.permute(1, 2, 0).numpy()
    x = F.interpolate(image[None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = ckpt.load(a)["model"], ckpt.load(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def evaluate_stage(
    ctx: Context, m: StageModel, val: SegDataset, batch_size: int, overlay_samples: Sequence[dict]
) -> StageResult:
    """Confusion matrix of ``last.pt`` on target val (all DDP ranks take part), plus best.pt's mIoU."""
    model = load_stage_model(m, m.last, ctx)
    cm = evaluate(model, val, ctx.num_classes, ctx.info, batch_size)
    res = StageResult(cm, cm.summary(ctx.class_names))
    if ctx.info.is_main and overlay_samples:
        images, sizes = [s["image"] for s in overlay_samples], [s["label"].shape for s in overlay_samples]
        res.overlay_preds = predict_labels(model, images, ctx.info.device, sizes)
    del model
    if m.best is not None and m.best.is_file():
        # Training stages export best == last when no intermediate evaluation beat the end: skip the re-run.
        if same_weights(m.last, m.best):
            res.best_miou, res.best_is_last = res.summary["miou"], True
        else:
            best = load_stage_model(m, m.best, ctx)
            res.best_miou = round(100.0 * evaluate(best, val, ctx.num_classes, ctx.info, batch_size).miou(), 4)
            del best
    return res


def pseudo_label_quality(ctx: Context, data: Data, stores: Sequence[PseudoStore]) -> tuple[dict[str, dict], list[str]]:
    """Coverage / accuracy / mIoU of the kept labels of each store; stores without ground truth are skipped."""
    load, ids = gt_loader(data)
    out: dict[str, dict] = {}
    notes: list[str] = []
    for s in stores:
        store = PseudoLabelStore(s.path)
        store.check_matches(ids, ctx.class_names)
        if s.selection is not None:  # the labels a class-balanced round trains with, by the KD step's rule
            sel = s.selection()
            extra = {"threshold": None, "selection": f"class-balanced, portion {sel.portion:g}"}
            q = evaluate_store_quality(store, load, 0.0, ctx.class_names, select=partial(kept_labels, sel))
        else:
            extra = {"threshold": s.threshold}
            q = evaluate_store_quality(store, load, s.threshold, ctx.class_names)
        if q is None:
            msg = f"pseudo-label quality of {s.path} skipped: target train has no ground truth"
            print(f"[{ctx.stage}] {msg}", flush=True)
            notes.append(msg)
            continue
        out[s.name] = {**q, **extra}
    return out, notes


def build_report(
    ctx: Context,
    data: Data,
    models: Sequence[StageModel],
    stores: Sequence[PseudoStore],
    final_stage: str,
    batch_size: int,
    n_overlays: int,
) -> Report:
    """Evaluates every model and the pseudo labels; on DDP ranks other than 0 returns a partial Report.

    ``final_stage`` names the model the run delivers (its confusion matrix is drawn).
    """
    check_inputs(models, stores)
    val = data.dataset("target_val", with_labels=True)
    samples = [val.load(i) for i in overlay_indices(val, n_overlays)] if ctx.info.is_main else []
    results: dict[str, StageResult] = {}
    for m in models:
        results[m.name] = evaluate_stage(ctx, m, val, batch_size, samples)
        if ctx.info.is_main:
            print(f"[{ctx.stage}] {m.name}: mIoU {results[m.name].summary['miou']:.2f}", flush=True)
    mious = {n: r.summary["miou"] for n, r in results.items()}
    baseline = SOURCE_ONLY if SOURCE_ONLY in mious else WARMUP
    adapted = [m.name for m in models if m.name not in (baseline, ORACLE)]
    gaps, notes = gap_closed(mious, adapted)
    quality: dict[str, dict] = {}
    if ctx.info.is_main:
        quality, q_notes = pseudo_label_quality(ctx, data, stores)
        notes += q_notes
    return Report(
        stages=results,
        gap_closed=gaps,
        pseudo_labels=quality,
        final_stage=final_stage,
        class_names=list(ctx.class_names),
        num_val_images=len(val),
        overlay_ids=[s["id"] for s in samples],
        overlay_images=[image_at(s["image"], s["label"].shape) for s in samples],
        overlay_labels=[s["label"].numpy() for s in samples],
        notes=notes,
    )
