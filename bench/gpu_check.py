"""The GPU check: one prepared script for a lent GPU, under 8 minutes, figures for the README.

1. Stage-1 cost with CUDA + bf16 autocast at the default and the paper config (DeepLab-v2 ResNet-101, crops
   of 512x896, EMA on 1024x2048 target images) at the preset's batch 4 and at batch 2 (what one of 2 processes
   holds): seconds per step, images per second, peak allocated memory, `overhead_ratio` (step / sum of its
   network passes), next to a supervised step (`bench_adapt_cost.py`'s worker, one fresh process per row so
   peaks do not mix).
2. DDP with NCCL, the real `ProDATask` (DDP-wrapped student, prototype update gathered across ranks), three
   steps, then the ranks' weights and prototypes are compared: 2 processes on 2 GPUs with the paper config at
   batch 2 per process, BatchNorm trained and synchronised (SyncBatchNorm, `base.sync_bn`), where 2 GPUs exist;
   and 2 processes on one GPU with the default config (NCCL refuses two ranks on one device on most setups: then
   reported as skipped, with NCCL's message).
3. The pseudo-label writer: images/s of inference + `PseudoLabelWriter` (the stage's writer) vs inference
   alone, at the paper's image size (soft maps 19x128x256), random-init weights.

`--dry-run` runs the same code on this CPU (gloo instead of NCCL; the `default` config only, few steps and
images), so the script is tested without a GPU: tests/test_bench.py passes tiny sizes with `--params FILE`, which
replaces params.yaml as the `default` config (the paper config is params/gta5_cityscapes.yaml either way).

    python bench/gpu_check.py [--dry-run] [--params FILE] [--out bench/results/gpu_check.json]
"""

from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_adapt_cost import load_config, make_batch, run_worker
from common import parser, table, write_result


# ---------------------------------------------------------------------------------------------- 1. stage 1
def stage1(dry: bool, iters: int, params: Path) -> list[dict[str, Any]]:
    device = "cpu" if dry else "cuda"
    rows = []
    configs = [("default", {})] if dry else [("default", {}), ("paper", {}), ("paper", {"adapt.optim.batch_size": 2})]
    for config, overrides in configs:
        for task in ("supervised", "proda"):
            spec = dict(config=config, params=str(params), task=task, amp=True, device=device, iters=iters)
            spec["overrides"] = overrides
            spec["warmup"] = 1 if dry else 3
            print(f"stage 1: {spec}", flush=True)
            r = {**run_worker(spec), "overrides": overrides}
            if not r["oom"]:
                r["images_per_s"] = sum(r["images_per_iter"].values()) / r["s_per_iter"]
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------------------------- 2. DDP
def _ddp_worker(rank: int, init: str, dry: bool, out_dir: str, params_file: str, config: str, per_gpu: bool) -> None:
    from pipeline.data.labels import class_names
    from pipeline.distributed import DistInfo
    from pipeline.engine.context import Context, new_model
    from pipeline.engine.loop import autocast
    from pipeline.maths.prototypes import PrototypeBank
    from pipeline.methods.proda import ProDATask

    result: dict[str, Any] = {"rank": rank}
    try:
        device = torch.device("cpu" if dry else f"cuda:{rank if per_gpu else 0}")  # one GPU per rank, or shared
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "gloo" if dry else "nccl"
        dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=2)
        overrides = {"adapt.optim.batch_size": 2} if config == "paper" else {}  # per process
        params = load_config(config, amp=True, overrides=overrides, params=params_file)
        torch.manual_seed(0)  # same initial weights on both ranks (DDP broadcasts rank 0's anyway)
        k = params.data.num_classes
        model = new_model(params.model, k).to(device).set_freeze_bn(params.adapt.freeze_bn).train()
        info = DistInfo(rank, 2, device.index or 0, device)
        ctx = Context("adapt", 0, info, class_names(k), sync_bn=params.base.sync_bn)
        bank = PrototypeBank(k, params.model.feat_dim)
        bank.protos.copy_(torch.randn(k, params.model.feat_dim))
        bank.initialized.fill_(True)
        task = ProDATask(ctx, model, bank, params.adapt)
        src, tgt = make_batch(params, device, torch.Generator().manual_seed(rank))  # each rank its own data
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with autocast(device, True):
                loss, _ = task.loss({"source": src, "target": tgt}, 0)
            loss.backward()
            task.optimizers()["model"].step()
            task.optimizers()["model"].zero_grad(set_to_none=True)
            task.after_step(0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        # Same weights and prototypes on both ranks after the steps: gather a checksum of each.
        sums = torch.stack([sum(p.double().sum() for p in model.parameters()), task.bank.protos.double().sum()])
        gathered = [torch.zeros_like(sums) for _ in range(2)]
        dist.all_gather(gathered, sums.to(device))
        images = sum(b["image"].shape[0] for b in (src, tgt)) * 2
        result.update(
            config=config,
            backend=backend,
            s_per_step=sorted(times)[1],
            images_per_s=images / sorted(times)[1],
            sync_bn=any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
            peak_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            weights_equal=bool(torch.equal(gathered[0][0], gathered[1][0])),
            prototypes_equal=bool(torch.equal(gathered[0][1], gathered[1][1])),
        )
        dist.destroy_process_group()
    except Exception as err:  # reported, not raised: the check goes on with the writer
        result["error"] = f"{type(err).__name__}: {err}".strip()[:1500]
        result["traceback"] = traceback.format_exc()[-3000:]
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def ddp(dry: bool, params: Path, config: str = "default", per_gpu: bool = False) -> dict[str, Any]:
    if not dry and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    if per_gpu and not dry and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: the 2-GPU check needs 2"}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"DDP: 2 processes, {'one device each' if per_gpu else 'one device'}, {config} config", flush=True)
        ctx = mp.start_processes(
            _ddp_worker,
            args=(str(Path(tmp) / "init"), dry, tmp, str(params), config, per_gpu),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        deadline = time.time() + 180
        while not ctx.join(timeout=5):
            if time.time() > deadline:  # a hung NCCL init: stop it and say so
                for p in ctx.processes:
                    p.kill()
                return {"skipped": "the two ranks did not finish within 180 s (hung NCCL initialisation?)"}
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2) if (Path(tmp) / f"rank{r}.pt").exists()]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors or len(ranks) < 2:
        return {"skipped": f"two processes could not share the device: {errors[0] if errors else 'a rank died'}"}
    keys = ("config", "backend", "s_per_step", "images_per_s", "sync_bn", "peak_allocated_mb")
    return {k: ranks[0][k] for k in (*keys, "weights_equal", "prototypes_equal")}


# ---------------------------------------------------------------------------------------------- 3. writer
def writer(dry: bool, n: int, params_file: Path) -> dict[str, Any]:
    from pipeline.engine.context import new_model
    from pipeline.methods.pseudo_labels import softmax_at_stride
    from pipeline.store.pseudo_store import PseudoLabelWriter

    device = torch.device("cpu" if dry else "cuda")
    params = load_config("default" if dry else "paper", amp=True, params=params_file)
    k = params.data.num_classes
    model = new_model(params.model, k).to(device).eval()
    size = params.data.image_size("target")
    bs = params.pseudo_label.batch_size
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (bs, 3, *size), dtype=torch.uint8, generator=gen) for _ in range(n // bs)]
    stride = model.output_stride
    h, w = -(-size[0] // stride), -(-size[1] // stride)
    print(f"writer: {len(images) * bs} images {size[0]}x{size[1]}, soft maps {k}x{h}x{w}", flush=True)

    def infer(store: PseudoLabelWriter | None) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i, x in enumerate(images):  # host uint8 batches, as the stage's loader hands them over
            prob = softmax_at_stride(model, x.to(device, non_blocking=True), flip=False)
            if store is not None:
                store.write_batch(i * bs, prob)
            elif device.type == "cuda":
                prob.max()  # the writer reads its result back; make pure inference wait for the GPU too
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    infer(None)  # warm-up (cuDNN autotuning, allocator)
    pure = infer(None)
    with tempfile.TemporaryDirectory() as tmp:
        ids = [f"c/c_{i:06d}_000019" for i in range(len(images) * bs)]
        names = [f"c{j}" for j in range(k)]
        p = params.pseudo_label
        t0 = time.perf_counter()
        with PseudoLabelWriter(Path(tmp) / "s.zarr", ids, names, h, w, "0" * 64, True, p.soft_dtype, p.chunk_mb) as st:
            infer(st)
        write = time.perf_counter() - t0  # includes draining the writer thread and the atomic rename
    n_img = len(images) * bs
    return {
        "images": n_img,
        "soft_map": [k, h, w],
        "pure_inference_images_per_s": n_img / pure,
        "writer_images_per_s": n_img / write,
        "writer_over_inference": pure / write,
    }


# ---------------------------------------------------------------------------------------------- driver
def main() -> None:
    ap = parser(__doc__, "gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="this CPU, gloo, few steps: checks the script itself")
    ap.add_argument("--iters", type=int, default=10, help="timed stage-1 steps per row (median)")
    ap.add_argument("--writer-images", type=int, default=64)
    args = ap.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on CPU")
    t0 = time.time()
    env: dict[str, Any] = {"dry_run": dry, "params": str(args.params), "torch": torch.__version__}
    if torch.cuda.is_available():
        env.update(
            gpu=torch.cuda.get_device_name(0),
            bf16=torch.cuda.is_bf16_supported(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    rows = stage1(dry, 1 if dry else args.iters, args.params)
    ddp_res = ddp(dry, args.params)
    ddp_two = ddp(dry, args.params, "default" if dry else "paper", per_gpu=True)
    writer_res = writer(dry, 8 if dry else args.writer_images, args.params)

    def cells(r: dict) -> list[str]:
        if r["oom"]:
            return [_name(r), r["task"], "OOM", "", "", ""]
        peak = r.get("peak_allocated_mb", r.get("peak_rss_mb"))
        return [
            _name(r),
            r["task"],
            f"{r['s_per_iter']:.3f}",
            f"{r['images_per_s']:.1f}",
            f"{peak:.0f}",
            f"{r['overhead_ratio']:.2f}",
        ]

    print("\nstage-1 and supervised steps, bf16 autocast; peak MiB: CUDA max allocated (CPU: process RSS)")
    print(table(["config", "task", "s/step", "img/s", "peak MiB", "overhead"], [cells(r) for r in rows]))
    print(f"\nDDP, 2 processes on one device: {ddp_res}")
    print(f"DDP, 2 processes on 2 devices (SyncBatchNorm where BN trains on CUDA): {ddp_two}")
    print(
        f"writer: {writer_res['writer_images_per_s']:.1f} img/s vs pure inference "
        f"{writer_res['pure_inference_images_per_s']:.1f} img/s ({writer_res['writer_over_inference']:.2f}x)"
    )
    total = time.time() - t0
    print(f"total {total:.0f} s")
    result = {**env, "stage1": rows, "ddp": ddp_res, "ddp_2gpu": ddp_two, "writer": writer_res, "seconds": total}
    write_result(args.out, result)


def _name(row: dict) -> str:
    batch = (row.get("overrides") or {}).get("adapt.optim.batch_size")
    return f"{row['config']} (batch {batch})" if batch else row["config"]


if __name__ == "__main__":
    main()
