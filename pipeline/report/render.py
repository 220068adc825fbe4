"""Writing the `evaluate` stage's report: metrics JSON, CSVs for ``dvc plots``, a confusion heatmap of the
final model, a grid of sample overlays, and a Markdown report that ties them together."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.labels import IGNORE_INDEX, palette
from pipeline.files import write_bytes, write_csv, write_json
from pipeline.maths.metrics import ConfusionMatrix
from pipeline.report.evaluation import LABELS, SOURCE_ONLY, WARMUP, Report

# File names inside the plots folder (dvc.yaml's top-level plots name them).
MIOU_BY_STAGE_CSV, PER_CLASS_DIR, PSEUDO_LABELS_CSV = "miou_by_stage.csv", "per_class", "pseudo_labels.csv"
# File names inside the reports folder (dvc.yaml declares each).
REPORT_MD, CONFUSION_PNG, CONFUSION_CSV, OVERLAYS_PNG = (
    "report.md",
    "confusion.png",
    "confusion_counts.csv",
    "overlays.png",
)


@dataclass(frozen=True)
class ReportOutputs:
    """Where `evaluate` writes (dvc.yaml passes each on the stage's command line)."""

    metrics: Path  # compact JSON for ``dvc metrics``
    plots: Path  # folder: miou_by_stage.csv, per_class/<stage>.csv, pseudo_labels.csv
    reports: Path  # folder: report.md, confusion.png, confusion_counts.csv, overlays.png


def _pct_cell(v: float | None) -> str | float:
    return "" if v is None or not math.isfinite(v) else round(float(v), 4)


def pseudo_label_round(name: str) -> int:
    """The KD round a pseudo-label store belongs to: 0 for the warm-up's soft labels, r for ``teacher_<r>``."""
    return 0 if name == WARMUP else int(name.removeprefix("teacher_"))


def write_csvs(report: Report, out: ReportOutputs) -> None:
    """The CSVs ``dvc plots`` draws (dvc.yaml's top-level ``plots`` names their columns)."""
    write_csv(
        out.plots / MIOU_BY_STAGE_CSV,
        [["stage", "miou"]] + [[n, _pct_cell(r.summary["miou"])] for n, r in report.stages.items()],
    )
    # One file per model (class, iou): dvc.yaml declares the folder once, so any number of KD rounds gets its
    # bar chart without a dvc.yaml edit.
    for n, r in report.stages.items():
        iou = r.summary["per_class_iou"]
        write_csv(
            out.plots / PER_CLASS_DIR / f"{n}.csv",
            [["class", "iou"], *([c, _pct_cell(iou[c])] for c in report.class_names)],
        )
    # Quality of the stored labels per round (0 = the warm-up's soft labels stage 1 trains on).
    quality = [["round", "labels", "threshold", "coverage", "pixel_acc", "miou"]]
    for n, q in sorted(report.pseudo_labels.items(), key=lambda kv: pseudo_label_round(kv[0])):
        quality.append(
            [
                pseudo_label_round(n),
                n,
                q.get("selection") or q["threshold"],
                *(_pct_cell(q[k]) for k in ("coverage", "pixel_acc", "miou")),
            ]
        )
    write_csv(out.plots / PSEUDO_LABELS_CSV, quality)
    # Raw counts of the final model: rows ground truth, columns prediction (+ predictions outside the classes).
    counts = report.stages[report.final_stage].cm.counts
    header = ["ground_truth \\ prediction", *report.class_names, "outside"]
    write_csv(
        out.reports / CONFUSION_CSV, [header] + [[c, *map(int, row)] for c, row in zip(report.class_names, counts)]
    )


def _save_figure(fig, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_bytes(path, buf.getvalue())


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
    ]
    # 16-class (SYNTHIA) runs: also the mean over 13 classes (no wall, fence, pole), the papers' mIoU*.
    m13 = all("miou_13" in r.summary for r in report.stages.values())
    has_gap = bool(report.gap_closed)  # empty without an oracle row (oracle.enabled: false)
    lines += [
        "| stage | mIoU (%) |"
        + (" mIoU-13 (%) |" if m13 else "")
        + " pixel acc. (%) |"
        + (" gap closed (%) |" if has_gap else "")
        + " best-on-val mIoU (%) — optimistic |",
        "|---|---:|" + ("---:|" if m13 else "") + "---:|" + ("---:|" if has_gap else "") + "---:|",
    ]
    for n, r in report.stages.items():
        gap = report.gap_closed.get(n)
        gap_s = "—" if n not in report.gap_closed else ("undefined" if gap is None else f"{gap:.1f}")
        best = _fmt(r.best_miou) + (" (= last)" if r.best_is_last else "")
        cell13 = f" {_fmt(r.summary['miou_13'])} |" if m13 else ""
        cell_gap = f" {gap_s} |" if has_gap else ""
        lines.append(
            f"| {_label(n)} | {_fmt(r.summary['miou'])} |{cell13} {_fmt(r.summary['pixel_acc'])} |{cell_gap} {best} |"
        )
    lines += [
        "",
        (
            "- **Source only** is the warm-up as trained on the source; the warm-up the later stages use has "
            "BatchNorm statistics of the unlabelled target train images (`warmup.target_bn`)."
            if SOURCE_ONLY in report.stages
            else "- The warm-up model is the **source-only** baseline here (it never saw target labels)."
        ),
        *(
            [
                "- Gap closed (%) = 100 · (mIoU − source-only mIoU) / (oracle mIoU − source-only mIoU): the share of "
                "the source-only → oracle gap that adaptation recovers."
            ]
            if has_gap
            else ["- No oracle row (`oracle.enabled: false`), so no gap-closed figure."]
        ),
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
            rule = q.get("selection") or f"{q['threshold']:g}"
            lines.append(f"| {what} | {rule} | {_fmt(q['coverage'])} | {_fmt(q['pixel_acc'])} | {_fmt(q['miou'])} |")
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
        f"[{CONFUSION_CSV}]({CONFUSION_CSV}).",
        "",
        f"![confusion matrix]({CONFUSION_PNG})",
        "",
        "## Sample overlays",
        "",
        f"The first {len(report.overlay_ids)} target val images by id; columns: image, ground truth, then each "
        "stage's prediction (Cityscapes colours over the image).",
        "",
        f"![overlays]({OVERLAYS_PNG})",
        "",
    ]
    if report.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""]
    return "\n".join(lines)


def write_outputs(report: Report, out: ReportOutputs) -> dict[str, Any]:
    """Writes every output (each atomically; the metrics JSON last) and returns the metrics dict."""
    render_confusion(
        report.stages[report.final_stage].cm,
        report.class_names,
        f"{report.final_stage} on target val: confusion, rows normalised (cells: % of the ground-truth class)",
        out.reports / CONFUSION_PNG,
    )
    render_overlays(report, out.reports / OVERLAYS_PNG)
    write_csvs(report, out)
    write_bytes(out.reports / REPORT_MD, markdown(report).encode())
    metrics = report.metrics()
    write_json(out.metrics, metrics)
    return metrics
