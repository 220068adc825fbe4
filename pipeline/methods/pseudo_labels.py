"""Offline inference stages' logic: soft/hard pseudo labels into zarr, their quality, prototype initialisation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline import cores
from pipeline.data.datasets import SegDataset
from pipeline.engine.context import Context, Data
from pipeline.engine.loop import autocast, collate
from pipeline.files import sha256_file, write_csv, write_json
from pipeline.maths.prototypes import PrototypeAccumulator, PrototypeBank
from pipeline.store.pseudo_store import PseudoLabelStore, PseudoLabelWriter
from pipeline.store.quality import evaluate_store_quality, write_quality


def _loader(ds: SegDataset, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate)


@torch.no_grad()
def softmax_at_stride(model: nn.Module, images: torch.Tensor, flip: bool, amp: bool = True) -> torch.Tensor:
    """Softmax at the network's output resolution; with `flip`, averaged with the flipped image's (un-flipped)."""
    x = images.float() / 255.0
    with autocast(images.device, amp):
        prob = F.softmax(model(x)[0].float(), dim=1)
        if flip:
            prob = 0.5 * (prob + F.softmax(model(x.flip(-1))[0].float(), dim=1).flip(-1))
    return prob


def write_pseudo_labels(
    ctx: Context,
    data: Data,
    model: nn.Module,
    model_path: str | Path,
    out: str | Path,
    *,
    batch_size: int,
    flip: bool,
    store_soft: bool,
    soft_dtype: str,
    chunk_mb: float,
) -> dict:
    """Pseudo labels for every target-train image, no augmentation, written atomically to a zarr store."""
    model.eval()
    ds = data.dataset("target_train", with_labels=False)
    first = ds.load(0)["image"]
    stride = model.output_stride
    h, w = -(-first.shape[1] // stride), -(-first.shape[2] // stride)
    t0 = time.time()
    compute = 0.0
    with PseudoLabelWriter(
        out,
        ds.ids,
        ctx.class_names,
        h,
        w,
        sha256_file(model_path),
        store_soft,
        soft_dtype,
        chunk_mb,
        extra={"flip": flip, "source_model": str(model_path)},
    ) as writer:
        start = 0
        for batch in tqdm(_loader(ds, batch_size, data.num_workers), desc=ctx.stage, dynamic_ncols=True):
            cores.rebalance()
            tc = time.time()
            prob = softmax_at_stride(model, batch["image"].to(ctx.info.device), flip)
            if prob.shape[-2:] != (h, w):
                raise ValueError(f"image {batch['id'][0]} gives a {tuple(prob.shape[-2:])} map, expected {(h, w)}")
            compute += time.time() - tc
            writer.write_batch(start, prob)
            start += prob.shape[0]
    seconds = time.time() - t0
    return {
        "images": len(ds),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(ds) / seconds, 2),
        "compute_seconds": round(compute, 2),
        "height": h,
        "width": w,
    }


def gt_loader(data: Data):
    """Target-train ground truth by id (None for images without labels), and the dataset's ids."""
    ds = data.dataset("target_train", with_labels=True)
    by_id = {r.id: i for i, r in enumerate(ds.records)}

    def load(image_id: str) -> np.ndarray | None:
        i = by_id.get(image_id)
        if i is None or ds.records[i].label is None:
            return None
        return ds.load(i)["label"].numpy()

    return load, ds.ids


def store_quality(
    ctx: Context,
    data: Data,
    store_path: str | Path,
    threshold: float,
    out_json: Path,
    out_csv: Path,
    extra: dict | None = None,
) -> dict | None:
    """Pseudo-label quality against target-train ground truth when it exists; otherwise a log line, no file."""
    gt, ids = gt_loader(data)
    store = PseudoLabelStore(store_path)
    store.check_matches(ids, ctx.class_names)
    summary = evaluate_store_quality(store, gt, threshold, ctx.class_names)
    if summary is None:
        write_json(out_json, {"skipped": "no ground truth for the target-train split", **(extra or {})})
        write_csv(out_csv, [["class", "iou", "kept_pixels", "gt_pixels"]])
        return None
    summary.update({"threshold": threshold, **(extra or {})})
    write_quality(out_json, out_csv, summary, ctx.class_names)
    return summary


@torch.no_grad()
def init_prototypes(
    ctx: Context, data: Data, model: nn.Module, store_path: str | Path, min_pixels: int, batch_size: int
) -> PrototypeBank:
    """Per image and class, mean pre-classifier feature of the pixels the store labels as that class, averaged."""
    model.eval()
    ds = data.dataset("target_train", with_labels=False)
    store = PseudoLabelStore(store_path)
    store.check_matches(ds.ids, ctx.class_names)
    acc = PrototypeAccumulator(ctx.num_classes, model.feat_dim, device=ctx.info.device)
    for batch in tqdm(_loader(ds, batch_size, data.num_workers), desc=ctx.stage, dynamic_ncols=True):
        cores.rebalance()
        with autocast(ctx.info.device, True):
            feat = model(batch["image"].to(ctx.info.device).float() / 255.0)[1].float()
        labels = torch.stack([torch.from_numpy(store.get(i)["label"].astype(np.int64)) for i in batch["id"]])
        if labels.shape[-2:] != feat.shape[-2:]:
            raise ValueError(
                f"pseudo-label store {store_path} is {tuple(labels.shape[-2:])}, the model's features are "
                f"{tuple(feat.shape[-2:])}: the store was made by another architecture"
            )
        acc.update(feat, labels.to(feat.device), min_pixels=min_pixels)
    return acc.finalize(ctx.class_names)
