"""How each self-training round selects its hard labels from its teacher's store.

Kept apart from the training code: the KD stage trains with this selection and the evaluate stage measures the
quality of the same labels (by the same rule, on the stored map before the view's warp), without importing the
training loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import SelectionParams
from pipeline.maths.selection import (
    ClassBalanced,
    ConfidenceThreshold,
    class_balanced_thresholds,
    portion_at_round,
    renormalise,
)
from pipeline.store.pseudo_store import PseudoLabelStore


def stored_labels(rec: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """An image's teacher labels and confidences as a KD round sees them: from the renormalised soft map when the
    store has one (what the KD step reads), else the stored hard map."""
    if "soft" in rec:
        conf, label = renormalise(torch.from_numpy(rec["soft"]), dim=0).max(dim=0)
        return label.numpy(), conf.numpy()
    return rec["label"], rec["conf"]


def kept_labels(selection: ClassBalanced, rec: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The labels ``selection`` keeps of one store record by the KD step's rule (on the unwarped map):
    the class-normalised argmax of the renormalised soft map, or the per-class thresholds on the hard map."""
    if "soft" in rec:
        label, conf = selection.select(renormalise(torch.from_numpy(rec["soft"]), dim=0)[None])
        return label[0].numpy(), conf[0].numpy()
    label = selection.apply(torch.from_numpy(rec["label"]).long()[None], torch.from_numpy(rec["conf"])[None])
    return label[0].numpy(), rec["conf"]


def round_selection(
    sel: SelectionParams, conf_threshold: float, r: int, store_path: str | Path
) -> ConfidenceThreshold | ClassBalanced:
    """How KD round ``r`` picks its hard labels from the teacher's store (``distill.selection``): a confidence
    threshold (``distill.conf_threshold``), or CBST's class-balanced thresholds set over the whole store at round
    ``r``'s portion. The KD
    stage trains with it and the report measures the same labels' quality."""
    if sel.kind == "threshold":
        return ConfidenceThreshold(conf_threshold)
    portion = portion_at_round(sel.portion, sel.portion_step, sel.portion_max, r)
    store = PseudoLabelStore(store_path)
    labels, conf = zip(*(stored_labels(store.get(i)) for i in store.ids), strict=True)
    return ClassBalanced(class_balanced_thresholds(labels, conf, store.num_classes, portion), portion)
