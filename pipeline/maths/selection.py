"""Pseudo-label selection: which pixels of a prediction become training labels, and with which class.

One home for every selection rule. A selection turns class probabilities ``[B, K, h, w]`` into hard labels
``[B, h, w]`` (``ignore_index`` where a pixel is not kept) and the confidence of each label
(:class:`Selection`). Today's rules:

* :class:`ConfidenceThreshold` keeps a pixel where its top probability is at least a fixed threshold (the KD
  rounds: 0.95; plain self-training);
* :class:`PrototypeRectification` is ProDA's online denoising: the fixed soft label ``p0`` reweighted by the
  prototype weights ``omega`` (``y_hat = argmax_k omega_k * p0_k``), then the same threshold (0 in the paper).

The threshold rule itself is :func:`keep_mask`: the quality report uses it too, so the pixels it counts as
kept are the ones training learns from. Class-balanced thresholds, mixture models and densification are further
implementations of the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from pipeline.data.ignore import IGNORE_INDEX


def keep_mask(conf: np.ndarray | Tensor, threshold: float) -> np.ndarray | Tensor:
    """Pixels whose confidence passes ``threshold``: ``conf >= threshold`` (strictly below is dropped).

    The paper keeps ``conf > 0.95``; confidences are stored as float16 (or uint8 levels) and 0.95 is not such a
    value, so ``>=`` and ``>`` keep exactly the same pixels at the thresholds in use."""
    return conf >= threshold


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
