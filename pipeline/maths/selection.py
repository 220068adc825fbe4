"""Pseudo-label selection: which pixels of a prediction become training labels, and with which class.

One home for every selection rule. A selection turns class probabilities ``[B, K, h, w]`` into hard labels
``[B, h, w]`` (``ignore_index`` where a pixel is not kept) and the confidence of each label
(:class:`Selection`). Today's rules:

* :class:`ConfidenceThreshold` keeps a pixel where its top probability is at least a fixed threshold (the KD
  rounds: 0.95; plain self-training);
* :class:`PrototypeRectification` is ProDA's online denoising: the fixed soft label ``p0`` reweighted by the
  prototype weights ``omega`` (``y_hat = argmax_k omega_k * p0_k``), then the same threshold (0 in the paper);
* :class:`ClassBalanced` is CBST's (Zou et al., ECCV 2018): one threshold per class, set over the whole target
  set by :func:`class_balanced_thresholds` so that each class keeps its most confident ``portion`` of pixels
  (:func:`portion_at_round` grows it per round), and the class-normalised argmax ``argmax_c p_c / lambda_c``.

The threshold rule itself is :func:`keep_mask`: the quality report uses it too, so the pixels it counts as
kept are the ones training learns from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pipeline.data.ignore import IGNORE_INDEX


def keep_mask(
    conf: np.ndarray | Tensor, threshold: float | Sequence[float], labels: np.ndarray | Tensor | None = None
) -> np.ndarray | Tensor:
    """Pixels whose confidence passes ``threshold``: ``conf >= threshold`` (strictly below is dropped).

    ``threshold`` is one number, or one per class (class-balanced), then applied to each pixel's ``labels``
    (labels outside ``0..K-1``, such as the ignore index, are compared with class 0's; callers drop them).
    The paper keeps ``conf > 0.95``; confidences are stored as float16 (or uint8 levels) and 0.95 is not such a
    value, so ``>=`` and ``>`` keep exactly the same pixels at the thresholds in use."""
    if np.ndim(threshold) == 0:  # one number (a Python or NumPy scalar)
        return conf >= threshold
    if labels is None:
        raise ValueError("per-class thresholds need the labels they apply to")
    k = len(threshold)
    if isinstance(conf, Tensor):
        thr = torch.as_tensor(threshold, dtype=conf.dtype, device=conf.device)
        lab = torch.as_tensor(labels, device=conf.device).long()
        return conf >= thr[torch.where((lab >= 0) & (lab < k), lab, 0)]
    thr_np = np.asarray(threshold, dtype=np.asarray(conf).dtype)
    lab_np = np.asarray(labels).astype(np.int64)
    return conf >= thr_np[np.where((lab_np >= 0) & (lab_np < k), lab_np, 0)]


def _restrict(labels: Tensor, keep: Tensor, valid: Tensor | None, ignore_index: int) -> Tensor:
    if valid is not None:
        keep = keep & torch.broadcast_to(valid.to(device=keep.device, dtype=torch.bool), keep.shape)
    return torch.where(keep, labels, torch.full_like(labels, ignore_index))


class Selection(Protocol):
    """A pseudo-label selection rule."""

    def select(self, prob: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Labels ``[B, h, w]`` (``ignore_index`` where not kept, or where ``valid`` is False) and their
        confidences ``[B, h, w]``, from class probabilities ``prob`` ``[B, K, h, w]``."""
        ...

    def describe(self) -> dict[str, Any]:
        """The rule's name and parameters (what a store or metrics file records about its labels)."""
        ...


@dataclass(frozen=True)
class ConfidenceThreshold:
    """Keep a pixel where its label's confidence is at least ``threshold``."""

    threshold: float
    ignore_index: int = IGNORE_INDEX

    def select(self, prob: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        conf, labels = prob.max(dim=1)
        return self.apply(labels, conf, valid), conf

    def apply(self, labels: Tensor, conf: Tensor, valid: Tensor | None = None) -> Tensor:
        """The rule on labels that are already hard (a store's ``label`` and ``conf``), same shapes."""
        if conf.shape != labels.shape:
            raise ValueError(f"conf {tuple(conf.shape)} must have the labels' shape {tuple(labels.shape)}")
        return _restrict(labels.long(), keep_mask(conf.float(), self.threshold), valid, self.ignore_index)

    def describe(self) -> dict[str, Any]:
        return {"selection": "threshold", "threshold": self.threshold}


def rectify(
    soft_pseudo: Tensor,
    weights: Tensor,
    conf_threshold: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Online prototypical rectification: ``y_hat = argmax_k(omega_k * p0_k)``.

    ``soft_pseudo`` is the fixed stage-1a soft label ``p0`` and ``weights`` the prototype weights ``omega``,
    both ``[B, K, h, w]`` in the same geometry. Returns ``(labels [B, h, w] long, rectified [B, K, h, w])``
    where ``rectified = omega * p0 / sum_k(omega * p0)``. A pixel becomes ``ignore_index`` when

    * its rectified max probability is below ``conf_threshold`` (0 keeps every pixel, as in the paper),
    * ``valid`` (bool, broadcastable to ``[B, h, w]``) is False there (padding, outside the crop), or
    * ``sum_k(omega * p0) == 0``: no class is supported by both (e.g. all-zero padded soft labels); its
      rectified distribution is then all zeros.
    """
    labels, rectified, _ = _rectify(soft_pseudo, weights, conf_threshold, ignore_index, valid)
    return labels, rectified


def _rectify(
    soft_pseudo: Tensor, weights: Tensor, conf_threshold: float, ignore_index: int, valid: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rectify` plus the rectified confidence it computes anyway (one reduction for both)."""
    if soft_pseudo.shape != weights.shape or soft_pseudo.dim() != 4:
        raise ValueError(
            f"soft_pseudo {tuple(soft_pseudo.shape)} and weights {tuple(weights.shape)} must be equal [B,K,h,w] shapes"
        )
    # float32 with autocast off: the product of two small probabilities underflows in bf16.
    with torch.autocast(device_type=soft_pseudo.device.type, enabled=False):
        prod = weights.float() * soft_pseudo.float()
        total = prod.sum(dim=1, keepdim=True)
        rectified = prod / total.clamp_min(torch.finfo(torch.float32).tiny)
        conf, labels = rectified.max(dim=1)
        keep = (total.squeeze(1) > 0) & keep_mask(conf, conf_threshold)
        labels = _restrict(labels, keep, valid, ignore_index)
    return labels, rectified, conf


@dataclass(frozen=True)
class PrototypeRectification:
    """ProDA's selection: ``p0`` rectified by the prototype weights ``omega`` (``[B, K, h, w]``, the same
    geometry as the probabilities it selects from), then kept where the rectified confidence is at least
    ``threshold``. Built per batch, since ``omega`` comes from the current prototypes and features."""

    weights: Tensor
    threshold: float = 0.0
    ignore_index: int = IGNORE_INDEX

    def select(self, prob: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        labels, _, conf = _rectify(prob, self.weights, self.threshold, self.ignore_index, valid)
        return labels, conf

    def rectified(self, prob: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Labels and the whole rectified distribution (:func:`rectify`)."""
        return rectify(prob, self.weights, self.threshold, self.ignore_index, valid)

    def describe(self) -> dict[str, Any]:
        return {"selection": "prototype_rectification", "threshold": self.threshold}


def renormalise(prob: Tensor, dim: int = 1) -> Tensor:
    """Stored probabilities made a distribution again: rounded ones (uint8 to 1/255 per class, float16) sum to 1
    only within about K/510. A pixel of all zeros (padding) stays zero."""
    return prob / prob.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def portion_at_round(start: float, step: float, maximum: float, r: int) -> float:
    """CBST's schedule: the portion of each class kept in round ``r`` (1-based), ``start + (r-1) step`` up to
    ``maximum`` (the paper: 0.2, +0.05 a round, up to 0.5)."""
    if r < 1:
        raise ValueError(f"round {r}: rounds count from 1")
    return min(maximum, start + (r - 1) * step)


def class_balanced_thresholds(
    labels: Iterable[np.ndarray], conf: Iterable[np.ndarray], num_classes: int, portion: float
) -> list[float]:
    """CBST's per-class thresholds over a whole target set: for class c, the confidences of the pixels
    predicted as c sorted in descending order, ``lambda_c = M_c[floor(len * portion)]`` (the paper's
    ``k_c = -log lambda_c``), so that ``conf >= lambda_c`` keeps the top ``portion`` of the class (ties
    included). A class no pixel predicts gets 1.0: only a certain prediction of it would pass.

    ``labels`` and ``conf`` are per-image arrays (hard labels and their confidences, e.g. a store's)."""
    if not 0.0 <= portion <= 1.0:
        raise ValueError(f"portion {portion} is not in [0, 1]")
    per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for lab, c in zip(labels, conf, strict=True):
        lab, c = np.asarray(lab).ravel(), np.asarray(c, dtype=np.float32).ravel()
        for k in np.unique(lab):
            if 0 <= k < num_classes:
                per_class[k].append(c[lab == k])
    out = []
    for values in per_class:
        if not values:
            out.append(1.0)
            continue
        m = np.sort(np.concatenate(values))[::-1]
        out.append(float(m[min(int(len(m) * portion), len(m) - 1)]))
    return out


@dataclass(frozen=True)
class ClassBalanced:
    """CBST's selection with per-class thresholds ``lambda`` (:func:`class_balanced_thresholds`): the label is
    the class-normalised argmax ``argmax_c p_c / lambda_c``, kept where ``p_c / lambda_c >= 1``."""

    thresholds: list[float]
    portion: float | None = None  # recorded only (how the thresholds were set)
    ignore_index: int = IGNORE_INDEX
    _lam: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lam = torch.tensor(self.thresholds, dtype=torch.float32)
        if (lam <= 0).any():
            raise ValueError(f"class thresholds must be positive, got {self.thresholds}")
        object.__setattr__(self, "_lam", lam)

    def select(self, prob: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if prob.shape[1] != len(self.thresholds):
            raise ValueError(f"{prob.shape[1]} classes for {len(self.thresholds)} thresholds")
        lam = self._lam.to(prob.device)[None, :, None, None]
        ratio = prob.float() / lam
        best, labels = ratio.max(dim=1)
        conf = prob.float().gather(1, labels[:, None])[:, 0]
        return _restrict(labels, best >= 1.0, valid, self.ignore_index), conf

    def apply(self, labels: Tensor, conf: Tensor, valid: Tensor | None = None) -> Tensor:
        """The thresholds on labels that are already hard (a store's ``label`` and ``conf``)."""
        labels = labels.long()
        keep = keep_mask(conf.float(), self.thresholds, labels) & (labels != self.ignore_index)
        return _restrict(labels, keep, valid, self.ignore_index)

    def describe(self) -> dict[str, Any]:
        return {"selection": "class_balanced", "portion": self.portion, "thresholds": list(self.thresholds)}
