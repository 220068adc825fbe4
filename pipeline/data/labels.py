"""Class definitions and label-ID -> train-ID maps, taken from `cityscapesscripts` (never hand-typed).

One ignore index (255) is used everywhere; every dataset is converted to contiguous train IDs at the boundary.
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as CS_LABELS

from pipeline.data.ignore import IGNORE_INDEX  # noqa: F401  (re-exported: the data side's name for it)

# The 19 Cityscapes evaluation classes, in train-ID order.
CS19_NAMES: list[str] = [
    lab.name for lab in sorted((x for x in CS_LABELS if 0 <= x.trainId < 255), key=lambda x: x.trainId)
]
# SYNTHIA-RAND-CITYSCAPES shares 16 of them (no terrain, truck, train); the 13-class protocol also drops
# wall, fence and pole.
_DROP16 = {"terrain", "truck", "train"}
_DROP13 = _DROP16 | {"wall", "fence", "pole"}
CLASS_NAMES: dict[int, list[str]] = {
    19: CS19_NAMES,
    16: [n for n in CS19_NAMES if n not in _DROP16],
    13: [n for n in CS19_NAMES if n not in _DROP13],
}

# Documented SYNTHIA id map: these SYNTHIA ids, in order, are the 16 classes above.
SYNTHIA_IDS_16: list[int] = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]
# All ids SYNTHIA-RAND-CITYSCAPES uses (0 void .. 22); others are corrupt labels.
SYNTHIA_VALID_IDS: frozenset[int] = frozenset(range(23))


def class_names(num_classes: int) -> list[str]:
    if num_classes not in CLASS_NAMES:
        raise ValueError(f"num_classes must be one of {sorted(CLASS_NAMES)}, got {num_classes}")
    return list(CLASS_NAMES[num_classes])


def cityscapes_lut(num_classes: int) -> np.ndarray:
    """256-entry lookup table: Cityscapes label ID -> contiguous train ID of the chosen class subset."""
    names = class_names(num_classes)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lab in CS_LABELS:
        if lab.id >= 0 and lab.name in names:
            lut[lab.id] = names.index(lab.name)
    return lut


def cityscapes_valid_ids() -> frozenset[int]:
    """Label IDs that may appear in a Cityscapes-format (or GTA5) label PNG."""
    return frozenset(lab.id for lab in CS_LABELS if lab.id >= 0) | {34}  # GTA5 has a 34 ("license plate")


def synthia_lut(num_classes: int) -> np.ndarray:
    """65536-entry table (SYNTHIA labels are 16-bit): SYNTHIA id -> train ID of the 16/13-class subset."""
    if num_classes not in (16, 13):
        raise ValueError(f"SYNTHIA has 16 or 13 classes, not {num_classes}")
    names = class_names(num_classes)
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for sid, name in zip(SYNTHIA_IDS_16, CLASS_NAMES[16]):
        if name in names:
            lut[sid] = names.index(name)
    return lut


def train_id_to_label_id(num_classes: int) -> np.ndarray:
    """Inverse map for writing predictions in Cityscapes label-ID format (ignore -> 0, 'unlabeled')."""
    names = class_names(num_classes)
    inv = np.zeros(256, dtype=np.uint8)
    for lab in CS_LABELS:
        if lab.name in names and 0 <= lab.trainId < 255:
            inv[names.index(lab.name)] = lab.id
    return inv


def palette(num_classes: int) -> np.ndarray:
    """Cityscapes colours for overlays, [K, 3] uint8."""
    by_name = {lab.name: lab.color for lab in CS_LABELS}
    return np.array([by_name[n] for n in class_names(num_classes)], dtype=np.uint8)
