"""Disk cost of soft pseudo labels: the public code's float32 ``.npy`` vs our zarr store (float16 / uint8).

Synthetic but realistic maps: softmax of smooth random logits (low-resolution noise upsampled bicubically, so
classes form blobs with soft boundaries, as a segmentation network's output does), K=19, at two sizes: the
default pipeline's map (target image at the model's output stride, from params.yaml) and 128x256 = 1/8 of
1024x2048, the stride-8 output the paper stores. The logit scale is chosen so that roughly half the pixels
have confidence > 0.95, in the range of a warm-up model on Cityscapes. Chunking follows params.yaml's
``pseudo_label.chunk_mb``.

Reports bytes per image for each format, the ratio to float32 ``.npy``, argmax agreement of the stored soft
labels with the stored (full-precision) ``label``, agreement of the rectified labels (argmax of omega * p0,
random prototypes) computed from the stored vs the full-precision soft labels, and writer throughput here.

    python bench/bench_store_size.py [results.json] [--n 300]
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
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from pipeline.config import parse_params  # noqa: E402
from pipeline.maths.prototypes import proto_logits  # noqa: E402
from pipeline.maths.selection import rectify  # noqa: E402
from pipeline.store.pseudo_store import PseudoLabelStore, PseudoLabelWriter  # noqa: E402

K = 19
PAPER_HW = (128, 256)  # stride 8 of 1024x2048, the map the public code stores per image


def default_hw() -> tuple[int, int]:
    """The soft map the default pipeline stores: the target image at the model's output stride."""
    p = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    h, w = p.data.image_size("target")
    s = p.model.output_stride
    return -(-h // s), -(-w // s)


def chunk_mb() -> float:
    return float(yaml.safe_load((REPO / "params.yaml").read_text())["pseudo_label"]["chunk_mb"])


def synthetic_probs(n: int, hw: tuple[int, int], seed: int = 0, scale: float = 12.0) -> torch.Tensor:
    h, w = hw
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, K, max(2, h // 16), max(2, w // 16), generator=g) * scale
    logits = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    logits += 0.3 * torch.randn(logits.shape, generator=g)  # pixel-level noise, like real logits have
    return logits.softmax(1)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def dir_files(path: Path) -> int:
    return sum(1 for f in path.rglob("*") if f.is_file())


def bench_store(root: Path, name: str, probs: torch.Tensor, ids: list[str], **kw) -> dict:
    path = root / name
    names = [f"c{k}" for k in range(K)]
    h, w = probs.shape[-2:]
    t0 = time.perf_counter()
    with PseudoLabelWriter(path, ids, names, h, w, "0" * 64, **kw) as wr:
        for i in range(0, len(ids), 4):  # batches of 4, as the pseudo-label stage would
            wr.write_batch(i, probs[i : i + 4])
        images_per_chunk = wr.images_per_chunk
    seconds = time.perf_counter() - t0
    n = len(ids)
    out = {
        "bytes_per_image": dir_bytes(path) / n,
        "files_per_image": dir_files(path) / n,
        "images_per_chunk": images_per_chunk,
        "per_array_bytes_per_image": {
            a: dir_bytes(path / a) / n for a in ("soft", "label", "conf") if (path / a).exists()
        },
        "write_images_per_s": n / seconds,
    }
    store = PseudoLabelStore(path)
    if store.has_soft:
        soft = torch.stack([torch.from_numpy(store.get(i)["soft"]) for i in ids])
        labels = np.stack([store.get(i)["label"] for i in ids])
        out["soft_argmax_agreement"] = float((soft.argmax(1).numpy() == labels).mean())
        out["soft_max_abs_error"] = float((soft - probs).abs().max())
        # Rectification (argmax of omega * p0) with the stored p0 vs the full-precision one, random prototypes.
        g = torch.Generator().manual_seed(1)
        omega = proto_logits(torch.randn(n, 16, h, w, generator=g), torch.randn(K, 16, generator=g)).softmax(1)
        out["rectified_agreement"] = float((rectify(soft, omega)[0] == rectify(probs, omega)[0]).float().mean())
    return out


def run_size(hw: tuple[int, int], n: int, mb: float) -> dict:
    probs = synthetic_probs(n, hw)
    conf = probs.max(1).values
    ids = [f"city/city_{i:06d}_000019" for i in range(n)]
    res: dict = {
        "shape": [K, *hw],
        "mean_conf": round(float(conf.mean()), 4),
        "frac_conf_gt_0.95": round(float((conf > 0.95).float().mean()), 4),
        "formats": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        npy_dir = root / "npy"
        npy_dir.mkdir()
        for i in range(n):  # public ProDA: one float32 [K, h, w] .npy per image
            np.save(npy_dir / f"{i}.npy", probs[i].numpy().astype(np.float32))
        fmts = res["formats"]
        fmts["float32_npy (public code)"] = {"bytes_per_image": dir_bytes(npy_dir) / n, "files_per_image": 1.0}
        fmts["zarr float16 soft+label+conf"] = bench_store(root, "f16.zarr", probs, ids, chunk_mb=mb)
        fmts["zarr uint8 soft+label+conf"] = bench_store(root, "u8.zarr", probs, ids, soft_dtype="uint8", chunk_mb=mb)
        fmts["zarr label+conf (hard round)"] = bench_store(root, "hard.zarr", probs, ids, store_soft=False, chunk_mb=mb)
    base = res["formats"]["float32_npy (public code)"]["bytes_per_image"]
    for r in res["formats"].values():
        r["ratio_vs_float32_npy"] = round(base / r["bytes_per_image"], 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="write results as JSON here")
    ap.add_argument("--n", type=int, default=300, help="synthetic images at the default size (1/10 of it at paper)")
    args = ap.parse_args()
    mb = chunk_mb()
    sizes = {"default": (default_hw(), args.n), "paper": (PAPER_HW, max(4, args.n // 10))}
    results: dict = {
        "chunk_mb": mb,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "sizes": {},
    }
    for name, (hw, n) in sizes.items():
        r = results["sizes"][name] = {"n_images": n, **run_size(hw, n, mb)}
        print(
            f"\n{name}: {n} images, K={K}, {hw[0]}x{hw[1]}; mean conf {r['mean_conf']}, "
            f"conf>0.95 on {100 * r['frac_conf_gt_0.95']:.1f}% of pixels; chunk_mb {mb}"
        )
        print(
            f"{'format':32s} {'KB/image':>10s} {'x smaller':>10s} {'img/chunk':>9s} {'files/img':>9s} "
            f"{'argmax agree':>13s} {'rectified agree':>15s} {'img/s':>7s}"
        )
        for fmt, f in r["formats"].items():
            agree, rect = f.get("soft_argmax_agreement"), f.get("rectified_agreement")
            print(
                f"{fmt:32s} {f['bytes_per_image'] / 1e3:10.2f} {f['ratio_vs_float32_npy']:10.2f} "
                f"{f.get('images_per_chunk', 1):9d} {f['files_per_image']:9.2f} "
                f"{'' if agree is None else f'{100 * agree:.4f}%':>13s} "
                f"{'' if rect is None else f'{100 * rect:.4f}%':>15s} "
                f"{f.get('write_images_per_s', float('nan')):7.1f}"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
