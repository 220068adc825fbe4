"""Disk cost of soft pseudo labels: the public code's float32 ``.npy`` vs our zarr store (float16 / uint8).

Synthetic but realistic maps: softmax of smooth random logits (low-resolution noise upsampled bicubically, so
classes form blobs with soft boundaries, as a segmentation network's output does), K=19 at 128x256 = 1/8 of
1024x2048, the stride-8 output the paper stores. The logit scale is chosen so that roughly half the pixels
have confidence > 0.95, in the range of a warm-up model on Cityscapes.

Reports bytes per image for each format, the ratio to float32 ``.npy``, argmax agreement of the stored soft
labels with the stored (full-precision) ``label``, and writer throughput on this machine's CPU.

    python bench/bench_store_size.py [results.json] [--n 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.store.pseudo_store import PseudoLabelStore, PseudoLabelWriter  # noqa: E402

K, H, W = 19, 128, 256


def synthetic_probs(n: int, seed: int = 0, scale: float = 12.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, K, H // 16, W // 16, generator=g) * scale
    logits = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)
    logits += 0.3 * torch.randn(logits.shape, generator=g)  # pixel-level noise, like real logits have
    return logits.softmax(1)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def dir_files(path: Path) -> int:
    return sum(1 for f in path.rglob("*") if f.is_file())


def bench_store(root: Path, name: str, probs: torch.Tensor, ids: list[str], **kw) -> dict:
    path = root / name
    names = [f"c{k}" for k in range(K)]
    t0 = time.perf_counter()
    with PseudoLabelWriter(path, ids, names, H, W, "0" * 64, **kw) as w:
        for i in range(0, len(ids), 4):  # batches of 4, as the pseudo-label stage would
            w.write_batch(i, probs[i : i + 4])
    seconds = time.perf_counter() - t0
    n = len(ids)
    out = {
        "bytes_per_image": dir_bytes(path) / n,
        "files_per_image": dir_files(path) / n,
        "per_array_bytes_per_image": {
            a: dir_bytes(path / a) / n for a in ("soft", "label", "conf") if (path / a).exists()
        },
        "write_images_per_s": n / seconds,
    }
    store = PseudoLabelStore(path)
    if store.has_soft:
        agree = [(store.get(i)["soft"].argmax(0) == store.get(i)["label"]).mean() for i in ids]
        out["soft_argmax_agreement"] = float(np.mean(agree))
        out["soft_max_abs_error"] = float(
            max(np.abs(store.get(i)["soft"] - probs[j].numpy()).max() for j, i in enumerate(ids))
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="write results as JSON here")
    ap.add_argument("--n", type=int, default=20, help="number of synthetic images")
    args = ap.parse_args()

    probs = synthetic_probs(args.n)
    conf = probs.max(1).values
    ids = [f"city/city_{i:06d}_000019" for i in range(args.n)]
    results: dict = {
        "n_images": args.n,
        "shape": [K, H, W],
        "mean_conf": round(float(conf.mean()), 4),
        "frac_conf_gt_0.95": round(float((conf > 0.95).float().mean()), 4),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "formats": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        npy_dir = root / "npy"
        npy_dir.mkdir()
        for i in range(args.n):  # public ProDA: one float32 [K, h, w] .npy per image
            np.save(npy_dir / f"{i}.npy", probs[i].numpy().astype(np.float32))
        results["formats"]["float32_npy (public code)"] = {
            "bytes_per_image": dir_bytes(npy_dir) / args.n,
            "files_per_image": 1.0,
        }
        results["formats"]["zarr float16 soft+label+conf"] = bench_store(root, "f16.zarr", probs, ids)
        results["formats"]["zarr uint8 soft+label+conf"] = bench_store(root, "u8.zarr", probs, ids, soft_dtype="uint8")
        results["formats"]["zarr label+conf (hard round)"] = bench_store(
            root, "hard.zarr", probs, ids, store_soft=False
        )
    base = results["formats"]["float32_npy (public code)"]["bytes_per_image"]
    for r in results["formats"].values():
        r["ratio_vs_float32_npy"] = round(base / r["bytes_per_image"], 2)

    print(
        f"{args.n} images, K={K}, {H}x{W}; mean conf {results['mean_conf']}, "
        f"conf>0.95 on {100 * results['frac_conf_gt_0.95']:.1f}% of pixels"
    )
    print(f"{'format':32s} {'KB/image':>10s} {'x smaller':>10s} {'files/img':>9s} {'argmax agree':>13s} {'img/s':>7s}")
    for name, r in results["formats"].items():
        agree = r.get("soft_argmax_agreement")
        print(
            f"{name:32s} {r['bytes_per_image'] / 1e3:10.1f} {r['ratio_vs_float32_npy']:10.2f} "
            f"{r['files_per_image']:9.1f} {'' if agree is None else f'{100 * agree:.4f}%':>13s} "
            f"{r.get('write_images_per_s', float('nan')):7.1f}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
