"""Pseudo-label generation: images/s of the pseudo_label stage's writer vs pure inference, and bytes per image of
the zarr store vs float32 soft labels.

On the target-train split of a workspace with a trained warm-up model (--workspace, e.g. a bench_accuracy
seed; otherwise a new workspace is made and `dvc repro warmup` run in it):

* write: `pipeline.methods.pseudo_labels.write_pseudo_labels` as the stage calls it (forward, softmax,
  argmax/confidence, compression and zarr writes in a background thread, atomic rename), to a scratch store;
* pure inference: the same loader and batch size, forward + softmax only (`softmax_at_stride`), nothing kept.

Both include image decoding (same loader). Median of --repeat runs each, interleaved, after one warm-up pass.
Bytes per image = the store's files on disk / images (soft, label and conf arrays, metadata); float32 =
K x h x w x 4 bytes, the raw soft map the public code saves per image (`.npy`, plus its 128-byte header).

    python bench/bench_pseudo_label.py [--workspace DIR | --workdir DIR] [--repeat 3]
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_store_size import dir_bytes
from common import bench_params, keep_dir, make_workspace, parser, table, timed_repro, write_result

from pipeline.engine.context import Data, load_model, setup
from pipeline.methods.pseudo_labels import _loader, softmax_at_stride, write_pseudo_labels

# The workspace layout dvc.yaml gives the pseudo_label stage.
MODEL, MANIFESTS = Path("models/warmup/last.pt"), Path("data/manifests")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = parser(__doc__, "pseudo_label")
    ap.add_argument("--workspace", type=Path, help="existing run with models/warmup/last.pt (its params are used)")
    ap.add_argument("--workdir", type=Path, help="without --workspace: new folder to build one in (default: temp)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes of each (median reported)")
    args = ap.parse_args()

    if args.workspace:
        root = args.workspace.resolve()
    else:
        root = make_workspace(keep_dir(args.workdir, "pseudo-label"), bench_params(args.params))
        print(f"dvc repro warmup in {root}", flush=True)
        timed_repro(root, ["warmup"], log=root / "repro.log")
    os.chdir(root)  # the pipeline's paths (data/manifests, models/) are relative to the workspace
    ctx, params = setup("pseudo_label")
    p, dev, data = params.pseudo_label, ctx.info.device, Data(params.data, MANIFESTS)
    model = load_model(MODEL, ctx).eval()
    ds = data.dataset("target_train", with_labels=False)
    n = len(ds)

    def infer() -> float:
        t0 = time.perf_counter()
        for batch in _loader(ds, p.batch_size, data.num_workers):
            softmax_at_stride(model, batch["image"].to(dev), flip=False)
        sync(dev)
        return time.perf_counter() - t0

    scratch = Path(tempfile.mkdtemp(prefix="bench-pl-"))
    try:
        infer()  # warm-up: page cache, allocator, lazy init
        t_infer, t_write, sizes = [], [], {}
        for i in range(args.repeat):
            t_infer.append(infer())
            store = scratch / f"s{i}.zarr"
            t0 = time.perf_counter()
            info = write_pseudo_labels(
                ctx,
                data,
                model,
                MODEL,
                store,
                batch_size=p.batch_size,
                flip=False,
                store_soft=True,
                soft_dtype=p.soft_dtype,
                chunk_mb=p.chunk_mb,
            )
            t_write.append(time.perf_counter() - t0)
            sizes = {a: dir_bytes(store / a) / n for a in ("soft", "label", "conf") if (store / a).exists()}
            sizes["total"] = dir_bytes(store) / n
            shutil.rmtree(store)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    k, h, w = ctx.num_classes, info["height"], info["width"]
    f32 = k * h * w * 4
    speed = {"pure_inference": n / statistics.median(t_infer), "write_pseudo_labels": n / statistics.median(t_write)}
    print(f"{n} target-train images, batch {p.batch_size}, soft labels {k}x{h}x{w} {p.soft_dtype}, device {dev}")
    print(
        table(
            ["", "images/s", "s/pass (median)"],
            [
                [label, f"{speed[key]:.2f}", f"{statistics.median(secs):.2f}"]
                for label, key, secs in [
                    ("pure inference (forward + softmax)", "pure_inference", t_infer),
                    ("write_pseudo_labels (stage)", "write_pseudo_labels", t_write),
                ]
            ],
        )
    )
    print(f"writer / pure inference speed: {speed['write_pseudo_labels'] / speed['pure_inference']:.2f}")
    print(
        table(
            ["format", "KB/image", "x smaller"],
            [
                ["float32 soft (K*h*w*4)", f"{f32 / 1e3:.1f}", "1.00"],
                # A ratio only where it compares like with like: soft vs soft, and the whole store vs soft alone.
                *[
                    [f"zarr {a}", f"{b / 1e3:.1f}", f"{f32 / b:.2f}" if a in ("soft", "total") else ""]
                    for a, b in sizes.items()
                ],
            ],
        )
    )
    write_result(
        args.out,
        {
            "params": str(args.params),
            "workspace": str(root),
            "device": str(dev),
            "images": n,
            "batch_size": p.batch_size,
            "soft_dtype": p.soft_dtype,
            "soft_shape": [k, h, w],
            "seconds": {"pure_inference": t_infer, "write_pseudo_labels": t_write},
            "images_per_s": speed,
            "write_over_inference": speed["write_pseudo_labels"] / speed["pure_inference"],
            "bytes_per_image": {"float32_soft": f32, "zarr": sizes},
            "ratio_float32_over_zarr": f32 / sizes["total"],
        },
    )


if __name__ == "__main__":
    main()
