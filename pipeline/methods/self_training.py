"""What the self-training stages (stage 1, KD rounds) share: target samples with their stored pseudo labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.config import StrongParams, ViewParams
from pipeline.data.views import make_strong_view, make_weak_view
from pipeline.engine.training import strong_config, weak_config
from pipeline.store.pseudo_store import PseudoLabelStore


class TargetViews:
    """Target sample of the self-training stages: the full image, a weak view, a strong view on the weak one,
    and the image's stored pseudo labels (``soft`` if stored, ``pl_label``, ``pl_conf``), read by id."""

    def __init__(self, view: ViewParams, strong: StrongParams, store_path: str | Path | None) -> None:
        self.weak = weak_config(view)
        self.strong = strong_config(strong)
        self.store = PseudoLabelStore(store_path) if store_path is not None else None

    def __call__(self, sample: dict, gen: torch.Generator) -> dict:
        weak = make_weak_view(sample["image"], None, self.weak, gen)
        strong = make_strong_view(weak, self.strong, gen)
        out = {
            "index": sample["index"],
            "full": sample["image"],
            "weak_image": weak.image,
            "weak_coords": weak.coords,
            "weak_valid": weak.valid,
            "image": strong.image,
            "coords": strong.coords,
            "coords_in_weak": strong.coords_in_weak,
            "valid": strong.valid,
        }
        if self.store is not None:
            rec = self.store.get(sample["id"])  # aligned by id, never by position
            if "soft" in rec:
                out["soft"] = torch.from_numpy(rec["soft"])
            out["pl_label"] = torch.from_numpy(rec["label"].astype(np.int64))
            out["pl_conf"] = torch.from_numpy(rec["conf"])
        return out
