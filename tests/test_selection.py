"""Pseudo-label selection rules (pipeline.maths.selection) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.maths.losses import cross_entropy
from pipeline.maths.selection import ConfidenceThreshold, PrototypeRectification, keep_mask, rectify


def test_keep_mask_keeps_the_threshold_itself() -> None:
    conf = np.array([0.5, 0.95, 0.96], dtype=np.float32)
    assert keep_mask(conf, np.float32(0.95)).tolist() == [False, True, True]
    assert keep_mask(torch.from_numpy(conf), 0.0).all()


def test_threshold_on_hard_labels_then_ce_uses_only_confident_pixels() -> None:
    # Three pixels, two classes: logits (0, log 3) -> p(1) = 3/4; (5, -5); (1, 1).
    logits = torch.tensor([[0.0, 5.0, 1.0], [math.log(3.0), -5.0, 1.0]]).reshape(1, 2, 1, 3)
    labels = torch.tensor([[[1, 1, 255]]])
    conf = torch.tensor([[[0.96, 0.5, 0.99]]])
    kept = ConfidenceThreshold(0.95).apply(labels, conf)
    assert kept.tolist() == [[[1, 255, 255]]]  # pixel 1 below the threshold; pixel 2 had no label
    assert cross_entropy(logits, kept).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert (ConfidenceThreshold(1.0).apply(labels, conf) == 255).all()
    valid = torch.tensor([[[False, True, True]]])
    assert (ConfidenceThreshold(0.0).apply(labels, conf, valid) == torch.tensor([[[255, 1, 255]]])).all()
    with pytest.raises(ValueError, match="shape"):
        ConfidenceThreshold(0.5).apply(labels, conf[..., :2])


def test_threshold_on_probabilities() -> None:
    prob = torch.tensor([[0.9, 0.4], [0.1, 0.6]]).reshape(1, 2, 1, 2)
    labels, conf = ConfidenceThreshold(0.7).select(prob)
    assert labels.tolist() == [[[0, 255]]]
    assert torch.allclose(conf, torch.tensor([[[0.9, 0.6]]]))
    assert ConfidenceThreshold(0.7).describe() == {"selection": "threshold", "threshold": 0.7}


def test_prototype_rectification_is_the_rectify_rule() -> None:
    # p0 = (0.6, 0.4), omega = (0.2, 0.8): omega * p0 = (0.12, 0.32) -> rectified (0.2727, 0.7273), class 1.
    p0 = torch.tensor([0.6, 0.4]).reshape(1, 2, 1, 1)
    omega = torch.tensor([0.2, 0.8]).reshape(1, 2, 1, 1)
    labels, conf = PrototypeRectification(omega).select(p0)
    assert labels.item() == 1
    assert conf.item() == pytest.approx(0.32 / 0.44, rel=1e-6)
    assert PrototypeRectification(omega, threshold=0.8).select(p0)[0].item() == 255
    same, rect = rectify(p0, omega)
    assert torch.equal(same, labels) and torch.allclose(rect.sum(dim=1), torch.ones(()))
    assert PrototypeRectification(omega, 0.5).describe()["selection"] == "prototype_rectification"
