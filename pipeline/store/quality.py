"""Pseudo-label quality against ground truth: how much is kept at a threshold, and how right it is.

Users of the public ProDA code asked for per-round pseudo-label quality; this module measures it for any store
written by :mod:`pipeline.store.pseudo_store` whenever target ground truth exists (Cityscapes train has it; a real
unlabeled target does not, and then the stage simply skips the report).

Definitions (all over pixels whose ground truth is not ``ignore_index``):

- a pixel is *kept* when ``conf >= threshold`` and its pseudo label is not ``ignore_index``; a confidence
  strictly below the threshold drops it: :func:`pipeline.maths.selection.keep_mask`, the rule training uses.
- ``coverage`` = kept pixels / valid ground-truth pixels.
- ``pixel_acc``, ``miou`` and ``per_class_iou`` compare kept pseudo labels with the ground truth on kept
  pixels only: they describe the labels training will actually see; dropped pixels show up in ``coverage``.
- ``kept_pixels`` / ``gt_pixels``: per-class counts of kept pseudo labels / of ground-truth labels.

Pseudo labels at a lower resolution than the ground truth are upsampled (nearest) to it before comparing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.ignore import IGNORE_INDEX
from pipeline.files import write_csv, write_json
from pipeline.maths.metrics import ConfusionMatrix
from pipeline.maths.selection import keep_mask
from pipeline.store.pseudo_store import PseudoLabelStore

logger = logging.getLogger(__name__)


def _pct(x: float) -> float | None:
    return None if not np.isfinite(x) else round(100.0 * float(x), 4)


class QualityAccumulator:
    """Accumulates pseudo-label quality over images; see the module docstring for the definitions."""

    def __init__(self, num_classes: int, threshold: float | Sequence[float], ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        # One threshold, or one per class (class-balanced selection), applied to each pixel's pseudo label.
        self.threshold = float(threshold) if np.ndim(threshold) == 0 else [float(t) for t in threshold]
        self.ignore_index = ignore_index
        self.cm = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.kept_per_class = np.zeros(num_classes, dtype=np.int64)
        self.gt_per_class = np.zeros(num_classes, dtype=np.int64)
        self.valid_pixels = 0
        self.kept_pixels = 0
        self.num_images = 0

    def update(
        self,
        label: np.ndarray | torch.Tensor,
        conf: np.ndarray | torch.Tensor,
        gt: np.ndarray | torch.Tensor,
    ) -> None:
        """One image: pseudo ``label`` [h, w], its ``conf`` [h, w], gt train ids ``gt`` [H, W]."""
        label_t = torch.as_tensor(np.asarray(label)).long()
        conf_t = torch.as_tensor(np.asarray(conf)).float()
        gt_t = torch.as_tensor(np.asarray(gt)).long()
        if label_t.ndim != 2 or label_t.shape != conf_t.shape or gt_t.ndim != 2:
            raise ValueError(
                f"expected label [h, w], conf [h, w], gt [H, W]; got {tuple(label_t.shape)}, "
                f"{tuple(conf_t.shape)}, {tuple(gt_t.shape)}"
            )
        if label_t.shape != gt_t.shape:
            size = tuple(gt_t.shape)
            # "nearest-exact" samples pixel centres; for the usual integer ratio (8) it equals "nearest".
            label_t = F.interpolate(label_t[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
            conf_t = F.interpolate(conf_t[None, None], size=size, mode="nearest-exact")[0, 0]
        k = self.num_classes
        valid = gt_t != self.ignore_index
        if valid.any() and (int(gt_t[valid].max()) >= k or int(gt_t[valid].min()) < 0):
            raise ValueError(f"ground-truth value outside 0..{k - 1} (and not {self.ignore_index})")
        kept = valid & keep_mask(conf_t, self.threshold, label_t) & (label_t != self.ignore_index)
        kept_label = label_t[kept]
        self.cm.update(kept_label, gt_t[kept])
        self.kept_per_class += torch.bincount(kept_label.clamp(0, k), minlength=k + 1)[:k].numpy()
        self.gt_per_class += torch.bincount(gt_t[valid], minlength=k)[:k].numpy()
        self.valid_pixels += int(valid.sum())
        self.kept_pixels += int(kept.sum())
        self.num_images += 1

    def coverage(self) -> float:
        return self.kept_pixels / self.valid_pixels if self.valid_pixels else float("nan")

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        """JSON-ready dict: percentages rounded to 4 dp (None where undefined), pixel counts as ints."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        iou = self.cm.iou()
        return {
            "threshold": self.threshold,
            "num_images": self.num_images,
            "valid_pixels": self.valid_pixels,
            "kept_pixels_total": self.kept_pixels,
            "coverage": _pct(self.coverage()),
            "pixel_acc": _pct(self.cm.pixel_accuracy()),
            "miou": _pct(self.cm.miou()),
            "per_class_iou": {n: _pct(v) for n, v in zip(class_names, iou)},
            "kept_pixels": {n: int(v) for n, v in zip(class_names, self.kept_per_class)},
            "gt_pixels": {n: int(v) for n, v in zip(class_names, self.gt_per_class)},
        }


def write_quality(
    out_json: str | Path, out_csv: str | Path, summary: dict[str, Any], class_names: Sequence[str]
) -> None:
    """``summary`` as JSON (for ``dvc metrics``) and a per-class table (for ``dvc plots``).

    CSV columns: ``class, iou, kept_pixels, gt_pixels`` (iou in percent, empty where undefined).
    """
    write_json(out_json, summary)
    rows = [
        [name, "" if (iou := summary["per_class_iou"].get(name)) is None else iou]
        + [summary["kept_pixels"].get(name, 0), summary["gt_pixels"].get(name, 0)]
        for name in class_names
    ]
    write_csv(out_csv, [["class", "iou", "kept_pixels", "gt_pixels"], *rows])


def _prefetch(
    store: PseudoLabelStore,
    gt_loader: Callable[[str], np.ndarray | None],
    ids: Sequence[str],
    num_threads: int,
) -> Iterator[tuple[str, dict[str, np.ndarray] | None, np.ndarray | None]]:
    """Yield (id, pseudo labels, gt) in order; PNG decoding and zarr reads overlap in a few threads."""

    def load(image_id: str) -> tuple[str, dict[str, np.ndarray] | None, np.ndarray | None]:
        gt = gt_loader(image_id)
        return image_id, (None if gt is None else store.get(image_id)), gt

    if num_threads <= 1:
        yield from map(load, ids)
        return
    with ThreadPoolExecutor(num_threads, thread_name_prefix="quality-load") as pool:
        it = iter(ids)
        # Bounded look-ahead: full-resolution ground truths are 2 MB each, so don't queue the whole split.
        pending = deque(pool.submit(load, i) for _, i in zip(range(2 * num_threads), it))
        while pending:
            fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield fut.result()


def evaluate_store_quality(
    store: PseudoLabelStore,
    gt_loader: Callable[[str], np.ndarray | None],
    threshold: float | Sequence[float],
    class_names: Sequence[str],
    num_threads: int = 2,
    select: Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any] | None:
    """Quality summary of every image in ``store`` that has ground truth, or None if none has any.

    ``gt_loader(id)`` returns the ground-truth train-id map [H, W] of an image, or None when it has none.
    ``select(record)``, if given, makes an image's kept labels and their confidences from its store record
    (``ignore_index`` where not kept; ``threshold`` then applies on top, normally 0).
    """
    if store.num_classes != len(class_names):
        raise ValueError(f"pseudo-label store {store.path} has {store.num_classes} classes, got {len(class_names)}")
    ids = store.ids  # opens the store in this thread before loader threads use it
    acc = QualityAccumulator(len(class_names), threshold)
    without_gt = 0
    for _, rec, gt in _prefetch(store, gt_loader, ids, num_threads):
        if gt is None or rec is None:
            without_gt += 1
            continue
        label, conf = select(rec) if select is not None else (rec["label"], rec["conf"])
        acc.update(label, conf, gt)
    if acc.num_images == 0:
        logger.info(
            "no ground truth for any of the %d images in %s: pseudo-label quality skipped",
            len(ids),
            store.path,
        )
        return None
    if without_gt:
        logger.warning(
            "%d of %d images in %s have no ground truth; quality covers the rest",
            without_gt,
            len(ids),
            store.path,
        )
    summary = acc.summary(class_names)
    summary["num_images_without_gt"] = without_gt
    return summary
