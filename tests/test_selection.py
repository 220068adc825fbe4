"""Pseudo-label selection rules (pipeline.maths.selection) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data.ignore import IGNORE_INDEX
from pipeline.maths.losses import cross_entropy
from pipeline.maths.selection import (
    ClassBalanced,
    ConfidenceThreshold,
    PrototypeRectification,
    class_balanced_thresholds,
    keep_mask,
    portion_at_round,
    rectify,
)


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


def test_portion_schedule_grows_by_step_up_to_the_maximum() -> None:
    assert [portion_at_round(0.2, 0.05, 0.5, r) for r in (1, 2, 3, 7, 20)] == pytest.approx([0.2, 0.25, 0.3, 0.5, 0.5])
    with pytest.raises(ValueError, match="rounds count from 1"):
        portion_at_round(0.2, 0.05, 0.5, 0)


def test_class_balanced_thresholds_by_hand() -> None:
    # Two images; class 0 predicted with confidences 0.9, 0.8, 0.7, 0.6, 0.5 (sorted), class 1 with 0.99, 0.3.
    labels = [np.array([[0, 0, 1]]), np.array([[0, 1, 0, 0]])]
    conf = [np.array([[0.9, 0.6, 0.99]]), np.array([[0.5, 0.3, 0.8, 0.7]])]
    # portion 0.4: class 0 -> M_0[floor(5 * 0.4) = 2] = 0.7; class 1 -> M_1[floor(2 * 0.4) = 0] = 0.99;
    # class 2 is never predicted -> 1.0.
    thr = class_balanced_thresholds(labels, conf, 3, 0.4)
    assert thr == pytest.approx([0.7, 0.99, 1.0])
    # portion 1: the least confident pixel of each class (everything kept); 0: the most confident one only.
    assert class_balanced_thresholds(labels, conf, 3, 1.0) == pytest.approx([0.5, 0.3, 1.0])
    assert class_balanced_thresholds(labels, conf, 3, 0.0) == pytest.approx([0.9, 0.99, 1.0])
    # conf >= lambda keeps the top portion of each class (ties included): 3 of class 0, 1 of class 1.
    kept = [keep_mask(c.astype(np.float32), thr, lab) for lab, c in zip(labels, conf, strict=True)]
    assert [int(k.sum()) for k in kept] == [2, 2]  # image 1: 0.9 and 0.99; image 2: 0.8 and 0.7
    with pytest.raises(ValueError, match="portion 1.5"):
        class_balanced_thresholds(labels, conf, 3, 1.5)


def test_class_balanced_selection_is_the_class_normalised_argmax() -> None:
    sel = ClassBalanced([0.8, 0.4], portion=0.2)
    # Pixel 0: p = (0.6, 0.4): plain argmax 0, but 0.6/0.8 = 0.75 < 0.4/0.4 = 1 -> class 1, kept.
    # Pixel 1: p = (0.9, 0.1): 0.9/0.8 = 1.125 -> class 0, kept. Pixel 2: p = (0.7, 0.3): 0.875 vs 0.75 -> class 0,
    # but 0.875 < 1 -> dropped. Pixel 3 is outside the view (valid False).
    prob = torch.tensor([[0.6, 0.9, 0.7, 0.9], [0.4, 0.1, 0.3, 0.1]])[None, :, None, :]
    valid = torch.tensor([[[True, True, True, False]]])
    labels, conf = sel.select(prob, valid)
    assert labels.tolist() == [[[1, 0, IGNORE_INDEX, IGNORE_INDEX]]]
    assert conf.flatten().tolist() == pytest.approx([0.4, 0.9, 0.7, 0.9])
    # On hard labels (a store's label and conf): conf >= lambda of the pixel's own class.
    hard = sel.apply(torch.tensor([[0, 1, 0, IGNORE_INDEX]]), torch.tensor([[0.79, 0.4, 0.8, 1.0]]))
    assert hard.tolist() == [[IGNORE_INDEX, 1, 0, IGNORE_INDEX]]
    assert sel.describe() == {"selection": "class_balanced", "portion": 0.2, "thresholds": [0.8, 0.4]}
    with pytest.raises(ValueError, match="3 classes for 2 thresholds"):
        sel.select(torch.ones(1, 3, 1, 1) / 3)
    with pytest.raises(ValueError, match="must be positive"):
        ClassBalanced([0.5, 0.0])


def test_uniform_class_thresholds_are_the_confidence_threshold() -> None:
    """With every lambda equal, CBST's rule is the plain threshold: the same labels, the same kept pixels."""
    prob = torch.softmax(torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    a, _ = ClassBalanced([0.6] * 5).select(prob)
    b, _ = ConfidenceThreshold(0.6).select(prob)
    assert torch.equal(a, b) and (a != IGNORE_INDEX).any() and (a == IGNORE_INDEX).any()
