"""Pseudo-label quality: a hand-computed case, the CSV/JSON writers and the no-ground-truth skip."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch

from pipeline.store.pseudo_store import PseudoLabelStore, PseudoLabelWriter
from pipeline.store.quality import QualityAccumulator, evaluate_store_quality, write_quality

NAMES = ["road", "car", "sky"]
X = 255  # ignore

# Pseudo labels at half the ground-truth resolution: each one covers a 2x2 block after nearest upsampling.
LABEL = np.array([[0, 1], [2, 1]], dtype=np.uint8)
CONF = np.array([[0.9, 0.4], [0.5, 0.8]], dtype=np.float32)  # 0.4 < 0.5 dropped; 0.5 == threshold kept
GT = np.array(
    [
        [0, 0, 1, 1],
        [0, X, 1, 1],
        [2, 1, 1, 0],
        [X, X, 1, 1],
    ],
    dtype=np.uint8,
)
# By hand, blocks TL/TR/BL/BR:
#   TL label 0 kept: gt 0,0,0 (+ignore)  -> 3 valid, 3 right
#   TR label 1 dropped: gt 1,1,1,1       -> 4 valid, none kept
#   BL label 2 kept: gt 2,1 (+2 ignore)  -> 2 valid, 1 right (gt 1 labelled 2)
#   BR label 1 kept: gt 1,0,1,1          -> 4 valid, 3 right (gt 0 labelled 1)
# valid 13, kept 9, right 7. On kept pixels: road TP3 FN1 FP0 -> 3/4; car TP3 FN1 FP1 -> 3/5;
# sky TP1 FP1 -> 1/2.
EXPECTED = {
    "coverage": round(100 * 9 / 13, 4),
    "pixel_acc": round(100 * 7 / 9, 4),
    "miou": round(100 * (3 / 4 + 3 / 5 + 1 / 2) / 3, 4),
    "per_class_iou": {"road": 75.0, "car": 60.0, "sky": 50.0},
    "kept_pixels": {"road": 3, "car": 4, "sky": 2},
    "gt_pixels": {"road": 4, "car": 8, "sky": 1},
}


def test_hand_computed_case():
    acc = QualityAccumulator(3, threshold=0.5)
    acc.update(LABEL, CONF, GT)
    s = acc.summary(NAMES)
    for key, value in EXPECTED.items():
        assert s[key] == value, key
    assert (s["num_images"], s["valid_pixels"], s["kept_pixels_total"]) == (1, 13, 9)
    json.dumps(s, allow_nan=False)  # JSON-ready


def test_same_resolution_and_ignored_pseudo_label():
    acc = QualityAccumulator(3, threshold=0.0)
    label = np.array([[0, X], [1, 1]], dtype=np.uint8)  # an ignored pseudo label is never "kept"
    acc.update(label, np.ones((2, 2), np.float32), np.array([[0, 0], [1, 2]], dtype=np.uint8))
    s = acc.summary(NAMES)
    assert s["coverage"] == 75.0 and s["pixel_acc"] == round(100 * 2 / 3, 4)
    assert s["per_class_iou"]["sky"] == 0.0


def test_write_quality(tmp_path):
    acc = QualityAccumulator(3, threshold=0.5)
    acc.update(LABEL, CONF, GT)
    s = acc.summary(NAMES)
    write_quality(tmp_path / "q.json", tmp_path / "plots" / "q.csv", s, NAMES)
    assert json.loads((tmp_path / "q.json").read_text())["miou"] == EXPECTED["miou"]
    rows = list(csv.DictReader((tmp_path / "plots" / "q.csv").open()))
    assert [r["class"] for r in rows] == NAMES
    assert rows[1] == {"class": "car", "iou": "60.0", "kept_pixels": "4", "gt_pixels": "8"}


def _store(tmp_path, ids):
    path = tmp_path / "pl.zarr"
    # Probabilities whose argmax/max reproduce LABEL/CONF (the 3-class rows sum to 1).
    prob = np.zeros((3, 2, 2), np.float32)
    for (r, c), lab in np.ndenumerate(LABEL):
        prob[:, r, c] = (1 - CONF[r, c]) / 2
        prob[lab, r, c] = CONF[r, c]
    prob[:, 0, 1] = [0.3, 0.4, 0.3]  # the dropped pixel: max 0.4 at "car"
    with PseudoLabelWriter(path, ids, NAMES, 2, 2, "0" * 64) as w:
        for i in range(len(ids)):
            w.write(i, torch.from_numpy(prob))
    return PseudoLabelStore(path)


def test_evaluate_store_quality(tmp_path, caplog):
    store = _store(tmp_path, ["a/1", "a/2", "b/3"])
    gts = {"a/1": GT, "b/3": GT}  # a/2 has no ground truth
    with caplog.at_level(logging.WARNING, logger="pipeline.store.quality"):
        s = evaluate_store_quality(store, gts.get, 0.5, NAMES)
    assert s is not None and s["num_images"] == 2 and s["num_images_without_gt"] == 1
    for key, value in EXPECTED.items():
        if key in ("kept_pixels", "gt_pixels"):
            value = {k: 2 * v for k, v in value.items()}
        assert s[key] == value, key
    assert "1 of 3 images" in caplog.text


def test_no_ground_truth_is_skipped(tmp_path, caplog):
    store = _store(tmp_path, ["a/1", "a/2"])
    with caplog.at_level(logging.INFO, logger="pipeline.store.quality"):
        assert evaluate_store_quality(store, lambda _id: None, 0.95, NAMES, num_threads=1) is None
    records = [r for r in caplog.records if r.name == "pipeline.store.quality"]
    assert len(records) == 1 and "no ground truth" in records[0].getMessage()


def test_class_count_mismatch(tmp_path):
    store = _store(tmp_path, ["a/1"])
    with pytest.raises(ValueError, match="has 3 classes"):
        evaluate_store_quality(store, lambda _id: GT, 0.5, NAMES[:2])
