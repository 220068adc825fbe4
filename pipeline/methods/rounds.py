"""How each self-training round selects its hard labels from its teacher's store.

Kept apart from the training code: the KD stage trains with this selection and the evaluate stage measures the
quality of the same labels, without importing the training loop.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import SelectionParams
from pipeline.maths.selection import ClassBalanced, ConfidenceThreshold, class_balanced_thresholds, portion_at_round
from pipeline.store.pseudo_store import PseudoLabelStore


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
    recs = [store.get(i, with_soft=False) for i in store.ids]
    thresholds = class_balanced_thresholds(
        (x["label"] for x in recs), (x["conf"] for x in recs), store.num_classes, portion
    )
    return ClassBalanced(thresholds, portion)
