"""The `evaluate` stage's logic: one report for the whole run.

Every stage's final model (``models/<stage>/last.pt``) is re-evaluated here on target val, so the table never
depends on numbers other stages wrote. Outputs: a compact metrics JSON (``dvc metrics diff``), CSVs for
``dvc plots``, a row-normalised confusion heatmap of the final model, a grid of sample overlays, and a
Markdown report that ties them together.

The warm-up model is the "source only" row: gap closed = (mIoU − warm-up mIoU) / (oracle mIoU − warm-up mIoU).
``best.pt`` (selected on target val itself) is reported in the Markdown only and labelled optimistic.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import CheckpointError
from pipeline.config import Params
from pipeline.datasets import SegDataset
from pipeline.engine import evaluate, predict_logits
from pipeline.inference import gt_loader
from pipeline.labels import IGNORE_INDEX, palette
from pipeline.metrics import ConfusionMatrix
from pipeline.pseudo_store import PseudoLabelStore
from pipeline.quality import evaluate_store_quality
from pipeline.runtime import Context, dataset, load_model, write_json

METRICS = Path("metrics/evaluate.json")
MIOU_CSV = Path("plots/evaluate/miou_by_stage.csv")
PER_CLASS_CSV = Path("plots/evaluate/per_class.csv")
REPORT_MD = Path("reports/report.md")
CONFUSION_PNG = Path("reports/confusion.png")
CONFUSION_CSV = Path("reports/confusion_counts.csv")
OVERLAYS_PNG = Path("reports/overlays.png")

OUTPUTS = (METRICS, MIOU_CSV, PER_CLASS_CSV, REPORT_MD, CONFUSION_PNG, CONFUSION_CSV, OVERLAYS_PNG)

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


def stage_models(params: Params) -> list[StageModel]:
    """The models of a run in report order: [source_only,] warmup, adapt, distill_1..N, oracle.

    With ``warmup.target_bn`` the warm-up saw target images (their BatchNorm statistics), so the model as
    trained on the source is its own row, ``source_only``, and the gap is measured from it.
    """
    out = [StageModel(SOURCE_ONLY, WARMUP, Path("models/warmup"), "source_only.pt", None)]
    out = out if params.warmup.target_bn else []
    out += [StageModel(WARMUP, WARMUP, Path("models/warmup")), StageModel(ADAPT, ADAPT, Path("models/adapt"))]
    for r in sorted(params.distill.rounds):
        out.append(StageModel(f"distill_{r}", f"distill@{r}", Path(f"models/distill_{r}")))
    out.append(StageModel(ORACLE, ORACLE, Path("models/oracle")))
    return out


def final_stage(params: Params) -> str:
    """The model the run delivers: the last KD round, or the stage-1 model when there are no rounds."""
    rounds = params.distill.rounds
    return f"distill_{max(rounds)}" if rounds else ADAPT


def pseudo_stores(params: Params) -> list[PseudoStore]:
    """Stage-1 soft labels (used whole, so threshold 0) and each round's hard labels at the KD threshold."""
    out = [PseudoStore(WARMUP, "pseudo_label", Path("pseudo/warmup.zarr"), 0.0)]
    for r in sorted(params.distill.rounds):
        out.append(
            PseudoStore(f"teacher_{r}", f"teacher@{r}", Path(f"pseudo/teacher_{r}.zarr"), params.distill.conf_threshold)
        )
    return out


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
        """The compact, diffable metrics JSON (mIoU, accuracy, coverage in %; gap closed as a fraction)."""
        return {
            "stages": {
                n: {"miou": _json_num(r.summary["miou"]), "pixel_acc": _json_num(r.summary["pixel_acc"])}
                for n, r in self.stages.items()
            },
            "gap_closed": self.gap_closed,
            "pseudo_labels": {
                n: {k: _json_num(q[k]) for k in ("threshold", "coverage", "pixel_acc", "miou")}
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
    """(mIoU − baseline) / (oracle − baseline) per adapted stage, as a fraction; None where undefined (+ a note).

    The baseline is the source-only model: ``source_only`` when the warm-up saw target images, else the warm-up.
    """
    w, o = mious.get(SOURCE_ONLY, mious.get(WARMUP)), mious.get(ORACLE)
    if not (_finite(w) and _finite(o)) or o <= w:
        note = (
            f"gap closed is undefined: the oracle mIoU ({o}) is not above the warm-up (source-only) mIoU ({w}), "
            "so there is no gap to close"
        )
        return {n: None for n in adapted}, [note]
    return {n: (round((mious[n] - w) / (o - w), 4) if _finite(mious[n]) else None) for n in adapted}, []


def overlay_indices(val: SegDataset, n: int) -> list[int]:
    """The first ``n`` val images by sorted id (deterministic whatever the manifest order)."""
    return sorted(range(len(val)), key=lambda i: val.records[i].id)[:n]


@torch.no_grad()
def predict_labels(model: torch.nn.Module, images: Sequence[torch.Tensor], device: torch.device) -> list[np.ndarray]:
    """Argmax train ids [H, W] of uint8 [3, H, W] images (one at a time: sizes may differ)."""
    model.eval()
    return [predict_logits(model, img[None].to(device))[0].argmax(0).cpu().numpy().astype(np.uint8) for img in images]


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = ckpt.load(a)["model"], ckpt.load(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def evaluate_stage(
    ctx: Context, m: StageModel, val: SegDataset, batch_size: int, overlay_images: Sequence[torch.Tensor]
) -> StageResult:
    """Confusion matrix of ``last.pt`` on target val (all DDP ranks take part), plus best.pt's mIoU."""
    model = load_stage_model(m, m.last, ctx)
    cm = evaluate(model, val, ctx.num_classes, ctx.info, batch_size)
    res = StageResult(cm, cm.summary(ctx.class_names))
    if ctx.info.is_main and overlay_images:
        res.overlay_preds = predict_labels(model, overlay_images, ctx.info.device)
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


def pseudo_label_quality(ctx: Context, stores: Sequence[PseudoStore]) -> tuple[dict[str, dict], list[str]]:
    """Coverage / accuracy / mIoU of the kept labels of each store; stores without ground truth are skipped."""
    load, ids = gt_loader(ctx)
    out: dict[str, dict] = {}
    notes: list[str] = []
    for s in stores:
        store = PseudoLabelStore(s.path)
        store.check_matches(ids, ctx.class_names)
        q = evaluate_store_quality(store, load, s.threshold, ctx.class_names)
        if q is None:
            msg = f"pseudo-label quality of {s.path} skipped: target train has no ground truth"
            print(f"[{ctx.stage}] {msg}", flush=True)
            notes.append(msg)
            continue
        out[s.name] = {**q, "threshold": s.threshold}
    return out, notes


def build_report(ctx: Context) -> Report:
    """Evaluates every stage's model and the pseudo labels; on DDP ranks other than 0 returns a partial Report."""
    p = ctx.params
    models, stores = stage_models(p), pseudo_stores(p)
    check_inputs(models, stores)
    val = dataset(ctx, "target_val", with_labels=True)
    samples = [val.load(i) for i in overlay_indices(val, p.evaluate.n_overlays)] if ctx.info.is_main else []
    images = [s["image"] for s in samples]
    results: dict[str, StageResult] = {}
    for m in models:
        results[m.name] = evaluate_stage(ctx, m, val, p.evaluate.batch_size, images)
        if ctx.info.is_main:
            print(f"[{ctx.stage}] {m.name}: mIoU {results[m.name].summary['miou']:.2f}", flush=True)
    mious = {n: r.summary["miou"] for n, r in results.items()}
    baseline = SOURCE_ONLY if SOURCE_ONLY in mious else WARMUP
    adapted = [m.name for m in models if m.name not in (baseline, ORACLE)]
    gaps, notes = gap_closed(mious, adapted)
    quality: dict[str, dict] = {}
    if ctx.info.is_main:
        quality, q_notes = pseudo_label_quality(ctx, stores)
        notes += q_notes
    return Report(
        stages=results,
        gap_closed=gaps,
        pseudo_labels=quality,
        final_stage=final_stage(p),
        class_names=list(ctx.class_names),
        num_val_images=len(val),
        overlay_ids=[s["id"] for s in samples],
        overlay_images=[s["image"].permute(1, 2, 0).numpy() for s in samples],
        overlay_labels=[s["label"].numpy() for s in samples],
        notes=notes,
    )


# -------------------------------------------------------------------------------------------- writing
def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_csv(path: Path, rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    _atomic_bytes(path, buf.getvalue().encode())


def _pct_cell(v: float | None) -> str | float:
    return "" if v is None or not math.isfinite(v) else round(float(v), 4)


def write_csvs(report: Report) -> None:
    _atomic_csv(MIOU_CSV, [["stage", "miou"]] + [[n, _pct_cell(r.summary["miou"])] for n, r in report.stages.items()])
    names = list(report.stages)
    rows: list[list[Any]] = [["class", *names]]
    for c in report.class_names:
        rows.append([c, *(_pct_cell(report.stages[n].summary["per_class_iou"][c]) for n in names)])
    _atomic_csv(PER_CLASS_CSV, rows)
    # Raw counts of the final model: rows ground truth, columns prediction (+ predictions outside the classes).
    counts = report.stages[report.final_stage].cm.counts
    header = ["ground_truth \\ prediction", *report.class_names, "outside"]
    _atomic_csv(CONFUSION_CSV, [header] + [[c, *map(int, row)] for c, row in zip(report.class_names, counts)])


def _save_figure(fig, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _atomic_bytes(path, buf.getvalue())


def render_confusion(cm: ConfusionMatrix, class_names: Sequence[str], title: str, path: Path) -> None:
    """Row-normalised (per ground-truth class) confusion heatmap with class names on both axes."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    k = len(class_names)
    rows = cm.counts.sum(1, keepdims=True).astype(np.float64)  # includes predictions outside the classes
    norm = np.where(rows > 0, cm.mat / np.maximum(rows, 1), np.nan)
    side = max(6.0, 0.42 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad="#dddddd")  # grey rows: classes absent from the ground truth
    im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=10)
    for (i, j), v in np.ndenumerate(norm):
        if np.isfinite(v) and v >= 0.01:
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the ground-truth class")
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)


# Overlay grid geometry (pixels).
PAD, HEADER_H, SWATCH_H, LEGEND_COL_W = 4, 28, 20, 150
MIN_TILE_W, MAX_TILE_W = 256, 384
ALPHA = 0.55


@dataclass(frozen=True)
class OverlayLayout:
    rows: int
    cols: int
    tile_h: int
    tile_w: int
    legend_rows: int
    legend_cols: int

    @property
    def width(self) -> int:
        return self.cols * self.tile_w + (self.cols + 1) * PAD

    @property
    def legend_top(self) -> int:
        return HEADER_H + self.rows * (self.tile_h + PAD) + PAD

    @property
    def height(self) -> int:
        return self.legend_top + self.legend_rows * SWATCH_H + PAD

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        return HEADER_H + row * (self.tile_h + PAD), PAD + col * (self.tile_w + PAD)


def overlay_layout(rows: int, cols: int, img_h: int, img_w: int, num_classes: int) -> OverlayLayout:
    """Tiles keep the image's aspect ratio at a legible width (small images are enlarged, large shrunk)."""
    tile_w = min(max(img_w, MIN_TILE_W), MAX_TILE_W)
    tile_h = max(1, round(img_h * tile_w / img_w))
    width = cols * tile_w + (cols + 1) * PAD
    legend_cols = max(1, width // LEGEND_COL_W)
    return OverlayLayout(rows, cols, tile_h, tile_w, math.ceil(num_classes / legend_cols), legend_cols)


def blend(image: np.ndarray, label: np.ndarray, colours: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Class colours over an RGB image [H, W, 3]; ignore pixels are shown as the dimmed image."""
    img = image.astype(np.float32)
    valid = label != IGNORE_INDEX
    colour = colours[np.where(valid, label, 0)].astype(np.float32)
    out = np.where(valid[..., None], (1 - alpha) * img + alpha * colour, 0.5 * img)
    return out.round().clip(0, 255).astype(np.uint8)


def _resize(tile: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if tile.shape[:2] == (h, w):
        return tile
    im = Image.fromarray(tile)
    # Enlarging keeps label edges crisp; shrinking averages (less aliasing on full-size Cityscapes).
    method = Image.NEAREST if w >= tile.shape[1] else Image.BOX
    return np.asarray(im.resize((w, h), method))


def render_overlays(report: Report, path: Path) -> OverlayLayout:
    """Grid: one row per sample; columns image, ground truth, then each stage's prediction; a colour legend."""
    from matplotlib.figure import Figure

    names = list(report.stages)
    headers = ["image", "ground truth", *names]
    colours = palette(len(report.class_names))
    imgs = report.overlay_images
    h, w = imgs[0].shape[:2] if imgs else (1, 2)
    lay = overlay_layout(len(imgs), len(headers), h, w, len(report.class_names))
    canvas = np.full((lay.height, lay.width, 3), 255, np.uint8)
    for r, (img, gt) in enumerate(zip(imgs, report.overlay_labels)):
        tiles = [img, blend(img, gt, colours)]
        tiles += [blend(img, report.stages[n].overlay_preds[r], colours) for n in names]
        for c, t in enumerate(tiles):
            y, x = lay.tile_origin(r, c)
            canvas[y : y + lay.tile_h, x : x + lay.tile_w] = _resize(t, lay.tile_h, lay.tile_w)
    for k in range(len(report.class_names)):
        y = lay.legend_top + (k // lay.legend_cols) * SWATCH_H
        x = PAD + (k % lay.legend_cols) * LEGEND_COL_W
        canvas[y + 3 : y + SWATCH_H - 3, x : x + 24] = colours[k]

    dpi = 100
    fig = Figure(figsize=(lay.width / dpi, lay.height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    # Text is placed in canvas pixel coordinates.
    for c, name in enumerate(headers):
        ax.text(
            PAD + c * (lay.tile_w + PAD) + lay.tile_w / 2, HEADER_H / 2, name, ha="center", va="center", fontsize=11
        )
    for r, image_id in enumerate(report.overlay_ids):
        y, x = lay.tile_origin(r, 0)
        ax.text(x + 3, y + 3, image_id, ha="left", va="top", fontsize=6, bbox={"fc": "white", "alpha": 0.7, "pad": 1})
    for k, name in enumerate(report.class_names):
        y = lay.legend_top + (k // lay.legend_cols) * SWATCH_H
        x = PAD + (k % lay.legend_cols) * LEGEND_COL_W
        ax.text(x + 30, y + SWATCH_H / 2, name, ha="left", va="center", fontsize=8)
    _save_figure(fig, path, dpi=dpi)
    return lay


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _label(name: str) -> str:
    if name.startswith("distill_"):
        return f"distill round {name.removeprefix('distill_')}"
    return LABELS.get(name, name)


def markdown(report: Report) -> str:
    """The human-readable report; links are relative to ``reports/``."""
    final = report.stages[report.final_stage].summary
    lines = [
        "# ProDA run report",
        "",
        f"Target val: {report.num_val_images} images, {len(report.class_names)} classes. Every model below was "
        f"re-evaluated here from its `models/<stage>/last.pt`. Final model: **{report.final_stage}** "
        f"(mIoU {_fmt(final['miou'])}%).",
        "",
        "## mIoU by stage",
        "",
        "| stage | mIoU (%) | pixel acc. (%) | gap closed | best-on-val mIoU (%) — optimistic |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, r in report.stages.items():
        gap = report.gap_closed.get(n)
        gap_s = "—" if n not in report.gap_closed else ("undefined" if gap is None else f"{100 * gap:.1f}%")
        best = _fmt(r.best_miou) + (" (= last)" if r.best_is_last else "")
        lines.append(f"| {_label(n)} | {_fmt(r.summary['miou'])} | {_fmt(r.summary['pixel_acc'])} | {gap_s} | {best} |")
    lines += [
        "",
        (
            "- **Source only** is the warm-up as trained on the source; the warm-up the later stages use has "
            "BatchNorm statistics of the unlabelled target train images (`warmup.target_bn`)."
            if SOURCE_ONLY in report.stages
            else "- The warm-up model is the **source-only** baseline here (it never saw target labels)."
        ),
        "- Gap closed = (mIoU − source-only mIoU) / (oracle mIoU − source-only mIoU): the share of the "
        "source-only → oracle gap that adaptation recovers.",
        "- *Best-on-val* is `best.pt`, the checkpoint with the highest mIoU on this same target val set during "
        "training: it was selected on the test data, so it is **optimistic** and not a fair result. The fair "
        "figures are the `last.pt` columns.",
        "",
        "## Per-class IoU (%)",
        "",
        "| class | " + " | ".join(report.stages) + " |",
        "|---|" + "---:|" * len(report.stages),
    ]
    for c in report.class_names:
        cells = [_fmt(r.summary["per_class_iou"][c]) for r in report.stages.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Pseudo-label quality (target train, against its ground truth)",
        "",
    ]
    if report.pseudo_labels:
        lines += [
            "| labels | threshold | coverage (%) | pixel acc. of kept (%) | mIoU of kept (%) |",
            "|---|---:|---:|---:|---:|",
        ]
        for n, q in report.pseudo_labels.items():
            what = "warm-up soft labels (stage 1)" if n == WARMUP else f"teacher round {n.removeprefix('teacher_')}"
            lines.append(
                f"| {what} | {q['threshold']:g} | {_fmt(q['coverage'])} | {_fmt(q['pixel_acc'])} | {_fmt(q['miou'])} |"
            )
        lines += [
            "",
            "Coverage: share of labelled pixels whose confidence passes the threshold; accuracy and mIoU are "
            "over those kept pixels only. Stage-1 soft labels are used whole (threshold 0).",
        ]
    else:
        lines.append("Not measured: target train has no ground truth.")
    lines += [
        "",
        f"## Confusion matrix of the final model ({report.final_stage})",
        "",
        "Row-normalised: each row is a ground-truth class, split by what the model predicted. Raw counts: "
        f"[{CONFUSION_CSV.name}]({CONFUSION_CSV.name}).",
        "",
        f"![confusion matrix]({CONFUSION_PNG.name})",
        "",
        "## Sample overlays",
        "",
        f"The first {len(report.overlay_ids)} target val images by id; columns: image, ground truth, then each "
        "stage's prediction (Cityscapes colours over the image).",
        "",
        f"![overlays]({OVERLAYS_PNG.name})",
        "",
    ]
    if report.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""]
    return "\n".join(lines)


def write_outputs(report: Report) -> dict[str, Any]:
    """Writes every output (each atomically; the metrics JSON last) and returns the metrics dict."""
    render_confusion(
        report.stages[report.final_stage].cm,
        report.class_names,
        f"{report.final_stage} on target val: confusion, rows normalised (cells: % of the ground-truth class)",
        CONFUSION_PNG,
    )
    render_overlays(report, OVERLAYS_PNG)
    write_csvs(report)
    _atomic_bytes(REPORT_MD, markdown(report).encode())
    metrics = report.metrics()
    write_json(METRICS, metrics)
    return metrics
