"""Confusion-matrix segmentation metrics (mIoU, per-class IoU) and their JSON/CSV writers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.data import labels as L
from pipeline.data.ignore import IGNORE_INDEX
from pipeline.files import write_csv


def class_argmax(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Index of the highest score along ``dim`` (the first one on ties, as ``argmax``).

    ``max(dim).indices`` instead of ``argmax(dim)``: on the CPU, argmax over the channel dim of an NCHW tensor
    takes a much slower strided path.
    """
    return scores.max(dim=dim).indices


class ConfusionMatrix:
    """Accumulates a K x K confusion matrix (rows: ground truth, cols: prediction) over a whole split.

    Pixels whose ground truth equals ``ignore_index`` are excluded, as in the official Cityscapes evaluator.
    A prediction outside ``0..K-1`` (e.g. an ignore value) is counted in an extra column: a false negative
    of its ground-truth class that is no class's false positive.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    @property
    def mat(self) -> np.ndarray:
        return self.counts[:, : self.num_classes]

    def update(self, pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> None:
        pred_t = torch.as_tensor(pred).reshape(-1).long()
        gt_t = torch.as_tensor(gt).reshape(-1).long()
        if pred_t.shape != gt_t.shape:
            raise ValueError(f"prediction has {pred_t.numel()} pixels, ground truth {gt_t.numel()}")
        keep = gt_t != self.ignore_index
        gt_t, pred_t = gt_t[keep], pred_t[keep]
        k = self.num_classes
        if gt_t.numel() and (int(gt_t.max()) >= k or int(gt_t.min()) < 0):
            raise ValueError(f"ground-truth value outside 0..{k - 1} (and not {self.ignore_index})")
        pred_t = torch.where((pred_t >= 0) & (pred_t < k), pred_t, torch.full_like(pred_t, k))
        idx = gt_t * (k + 1) + pred_t
        self.counts += torch.bincount(idx, minlength=k * (k + 1)).reshape(k, k + 1).cpu().numpy()

    def merge(self, other: ConfusionMatrix) -> None:
        self.counts += other.counts

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class absent from both ground truth and prediction."""
        tp = np.diag(self.mat).astype(np.float64)
        fn = self.counts.sum(1) - tp
        fp = self.mat.sum(0) - tp
        denom = tp + fp + fn
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.diag(self.mat).sum() / total) if total else float("nan")

    def summary(self, class_names: Sequence[str]) -> dict:
        """Metrics as a JSON-ready dict: mIoU and pixel accuracy in percent, per-class IoU by name.

        A 16-class (SYNTHIA) run also gets ``miou_13``: the mean IoU of the same model over the 13 classes
        without wall, fence and pole (the papers' mIoU*), from this confusion matrix.
        """
        iou = self.iou()
        out = {
            "miou": round(100.0 * self.miou(), 4),
            "pixel_acc": round(100.0 * self.pixel_accuracy(), 4),
            "per_class_iou": {
                n: (None if np.isnan(v) else round(100.0 * float(v), 4)) for n, v in zip(class_names, iou)
            },
        }
        if list(class_names) == L.class_names(16):
            sub = iou[[i for i, n in enumerate(class_names) if n in set(L.class_names(13))]]
            out["miou_13"] = round(100.0 * float(np.nanmean(sub)), 4) if np.isfinite(sub).any() else float("nan")
        return out


def write_per_class_csv(path: str | Path, class_names: Sequence[str], iou: np.ndarray) -> None:
    """Per-class IoU as a CSV table (``class,iou``) for ``dvc plots``."""
    rows = [[name, "" if np.isnan(v) else round(100.0 * float(v), 4)] for name, v in zip(class_names, iou)]
    write_csv(path, [["class", "iou"], *rows])


def confusion_from_label_id_pngs(
    pairs: Sequence[tuple[str | Path, str | Path]], num_classes: int = 19
) -> ConfusionMatrix:
    """Confusion matrix of predictions written in Cityscapes label-ID format against gtFine labelIds."""
    from PIL import Image

    from pipeline.data.labels import cityscapes_lut

    lut = cityscapes_lut(num_classes)
    cm = ConfusionMatrix(num_classes)
    for pred_path, gt_path in pairs:
        pred = lut[np.asarray(Image.open(pred_path))]
        gt = lut[np.asarray(Image.open(gt_path))]
        cm.update(pred.astype(np.int64), gt.astype(np.int64))
    return cm
