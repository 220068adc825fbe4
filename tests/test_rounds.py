"""A self-training round's label selection on a real uint8 store: what the KD step keeps is what the report counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import SelectionParams
from pipeline.data.ignore import IGNORE_INDEX
from pipeline.maths.selection import ClassBalanced, ConfidenceThreshold, renormalise
from pipeline.methods.rounds import kept_labels, round_selection, stored_labels
from pipeline.store.pseudo_store import PseudoLabelStore, PseudoLabelWriter
from pipeline.store.quality import QualityAccumulator

K, H, W = 4, 6, 8
NAMES = [f"c{k}" for k in range(K)]


def _store(tmp_path: Path, n: int = 5) -> tuple[Path, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Peaked maps: after uint8 rounding many runner-up classes are 0 and a pixel's sum is not 1.
    probs = torch.softmax(6 * torch.randn(n, K, H, W, generator=g), dim=1)
    path = tmp_path / "teacher.zarr"
    with PseudoLabelWriter(path, [f"i{k}" for k in range(n)], NAMES, H, W, "0" * 64, soft_dtype="uint8") as w:
        w.write_batch(0, probs)
    return path, probs


def test_a_uint8_pixel_is_renormalised_before_its_confidence_is_read() -> None:
    # 0.97 for class 0 and 0.01 for each other class: uint8 rounds them to 247/255 and 3/255 (sum 256/255).
    soft = np.zeros((K, 1, 1), dtype=np.float32)
    soft[:, 0, 0] = np.array([247, 3, 3, 3]) / 255
    label, conf = stored_labels(
        {"soft": soft, "label": np.zeros((1, 1), np.uint8), "conf": np.ones((1, 1), np.float32)}
    )
    assert label.tolist() == [[0]] and conf[0, 0] == pytest.approx(247 / 256)


def test_class_balanced_round_keeps_each_class_top_portion_and_the_report_counts_the_same(tmp_path: Path) -> None:
    path, _ = _store(tmp_path)
    store = PseudoLabelStore(path)
    sel_params = SelectionParams(kind="class_balanced", portion=0.2, portion_step=0.1, portion_max=0.5)
    sel = round_selection(sel_params, 0.95, 2, path)
    assert isinstance(sel, ClassBalanced) and sel.portion == pytest.approx(0.3)  # round 2: 0.2 + 0.1
    recs = [store.get(i) for i in store.ids]
    label = np.stack([stored_labels(r)[0] for r in recs])
    conf = np.stack([stored_labels(r)[1] for r in recs])
    for c in range(K):  # lambda_c is the confidence ranked floor(n * 0.3): that many lie above it (ties kept too)
        n, of_c = int((label == c).sum()), conf[label == c]
        assert int((of_c > sel.thresholds[c]).sum()) <= int(n * 0.3) < int((of_c >= sel.thresholds[c]).sum())
    # The report's kept labels are the KD step's rule on each stored map: the class-normalised argmax.
    for r in recs:
        got, _ = kept_labels(sel, r)
        want, _ = sel.select(renormalise(torch.from_numpy(r["soft"]), dim=0)[None])
        assert np.array_equal(got, want[0].numpy())
    # Quality counts exactly those pixels.
    acc = QualityAccumulator(K, 0.0)
    for r in recs:
        lab, c = kept_labels(sel, r)
        acc.update(lab, c, np.zeros((H, W), dtype=np.int64))
    kept = sum(int((kept_labels(sel, r)[0] != IGNORE_INDEX).sum()) for r in recs)
    assert acc.kept_pixels == kept and 0 < kept < len(recs) * H * W


def test_threshold_round_is_the_confidence_threshold(tmp_path: Path) -> None:
    path, _ = _store(tmp_path)
    p = SelectionParams(kind="threshold", portion=0.2, portion_step=0.05, portion_max=0.5)
    assert round_selection(p, 0.95, 1, path) == ConfidenceThreshold(0.95)
