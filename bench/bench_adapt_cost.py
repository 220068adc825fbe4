"""Cost of the adaptation step: seconds and peak memory per iteration of ProDA stage 1 (`ProDATask`) vs a plain
supervised step (`SupervisedTask`, CE) of the same model, optimizer settings and source batch.

One batch of the right structure is built once by the real view code (`WeakTransform`, `TargetViews`) from random
images of the configured sizes, with random soft pseudo labels and initialised prototypes; each iteration is what
the training loop does: loss under autocast, backward, optimizer step, `after_step` (EMA and prototype updates).
Data loading and augmentation are not timed. Seconds = median of --iters steps after --warmup steps.

Each (config, task, AMP) runs in a fresh subprocess so peaks do not mix:
* CUDA: `torch.cuda.max_memory_allocated` over all steps (absolute: weights, optimizer state, activations);
  goal: the paper's stage-1 batch fits in 24 GiB.
* CPU: resident memory from /proc/self/status, in a second process of its own in which glibc is told to return
  large blocks to the system at once (MALLOC_MMAP_THRESHOLD_), so RSS follows live tensors. `peak_extra_mb` =
  peak RSS during the steps (VmHWM, reset before the first step) - RSS after building model, task and batch;
  `peak_rss_mb` is the whole process. Times come from a process with glibc's default allocator, as training
  runs: under the memory-tracking settings every large tensor is a fresh mmap and the step takes about 2x longer.
AMP = bf16 autocast (`optim.amp`), on CUDA and on CPU (oneDNN bf16 kernels: AVX512-BF16/AMX); both are run. A
device without native bf16 (an AVX2-only CPU) runs amp in fp32, so there the two memory formats are timed in fp32.

`passes_s` times each network pass of the step on its own (student forward per domain, EMA forward, backward
through the student forwards from a plain sum of their outputs; the student forwards in one autocast region,
as in the step), each round right after the step, so that a shared machine's drifts hit both alike;
`overhead_ratio` = step time / their sum, i.e. what views, warps, prototype distances, losses, optimizer, EMA
and prototype updates and Python add.

Configs: `default` = params.yaml, or the file given with --params (model, adapt crop and batch, embedded
image size); `paper` = params/gta5_cityscapes.yaml (DeepLab-v2 ResNet-101 width 64, feat_dim 256, crop 512x896,
batch 4, target images 1100x2200 for the EMA's full view). `--device auto` (default) runs `default` on this CPU
and, when a GPU is present, `default` and `paper` on it with AMP on and off; --configs overrides. `--amp on|off`
runs that setting alone, in the params' memory format (one supervised + ProDA pair per config and device).

    python bench/bench_adapt_cost.py [--configs default paper] [--device auto] [--iters 10] [--warmup 2]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from common import REPO, bench_params, parse_sets, parser, set_dotted, table, write_result
from torch.profiler import ProfilerActivity, profile, record_function

GIB = 1024**3
DEFAULT = REPO / "params.yaml"
BUDGET_GIB = 24  # the goal: a 24 GB card (RTX 3090/4090 class)


# ---------------------------------------------------------------------------------------------- worker
def load_config(name: str, amp: bool, overrides: dict[str, Any] | None = None, params: str | Path = DEFAULT):
    """Config `name`: "paper", or "default" = the params file `params` (--params)."""
    from pipeline.config import parse_params

    if name == "paper":
        raw = yaml.safe_load((REPO / "params" / "gta5_cityscapes.yaml").read_text())
        raw["model"]["pretrained"] = None  # random init: same cost, no weight file needed
        for domain, stored in (("source", [1052, 1914]), ("target", [1024, 2048])):  # GTA5, Cityscapes as stored
            raw["data"][domain]["resize"] = raw["data"][domain]["resize"] or stored
    else:
        raw = bench_params(Path(params))
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    raw["adapt"]["optim"]["amp"] = amp  # ProDATask's own autocast (EMA forwards) follows the step's setting
    return parse_params(raw)


def make_batch(params, device: torch.device, gen: torch.Generator) -> tuple[dict, dict]:
    """A source batch and a target batch as the adapt stage's streams deliver them, from random images."""
    from pipeline.engine.loop import collate, to_device
    from pipeline.engine.training import WeakTransform
    from pipeline.methods.self_training import TargetViews

    p, k = params.adapt, params.data.num_classes
    bs, stride = p.optim.batch_size, params.model.output_stride
    src_size, tgt_size = params.data.image_size("source"), params.data.image_size("target")
    weak, views = WeakTransform(p.view), TargetViews(p.view, p.strong, None)

    def image(size: tuple[int, int]) -> torch.Tensor:
        return torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=gen)

    src, tgt = [], []
    for i in range(bs):
        label = torch.randint(0, k, src_size, generator=gen)
        src.append(weak({"index": i, "image": image(src_size), "label": label}, gen))
        t = views({"index": i, "id": str(i), "image": image(tgt_size)}, gen)
        # Soft labels as stored: softmax at the network's stride of the full image.
        h, w = -(-tgt_size[0] // stride), -(-tgt_size[1] // stride)
        t["soft"] = torch.randn(k, h, w, generator=gen).mul(3).softmax(0).half()
        tgt.append(t)
    return to_device(collate(src), device), to_device(collate(tgt), device)


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Times `spec['task']` on `spec['config']` (``spec['measure']`` "time"), or measures its peak memory only
    ("memory"; CPU RSS needs a process with other allocator settings); runs in its own process."""
    from pipeline import cores
    from pipeline.data.labels import class_names
    from pipeline.distributed import DistInfo
    from pipeline.engine.context import Context, new_model
    from pipeline.engine.loop import autocast
    from pipeline.maths.prototypes import PrototypeBank
    from pipeline.methods.proda import ProDATask
    from pipeline.methods.supervised import SupervisedTask

    torch.manual_seed(0)
    params = load_config(spec["config"], spec["amp"], spec.get("overrides"), spec.get("params", DEFAULT))
    device = torch.device(spec["device"])
    if device.type == "cpu":
        cores.join(params.base.threads)  # as a stage does: threads follow the jobs sharing the cores
    k = params.data.num_classes
    channels_last = spec.get("channels_last", params.base.channels_last)
    ctx = Context("adapt", params.base.seed, DistInfo(0, 1, 0, device), class_names(k), channels_last=channels_last)
    model = ctx.place(new_model(params.model, k)).train()
    src, tgt = make_batch(params, device, torch.Generator().manual_seed(0))
    if spec["task"] == "proda":
        bank = PrototypeBank(k, params.model.feat_dim)
        bank.protos.copy_(torch.randn(k, params.model.feat_dim))
        bank.initialized.fill_(True)
        task: Any = ProDATask(ctx, model, bank, params.adapt)
        batch = {"source": src, "target": tgt}
    else:
        task = SupervisedTask(model, model, params.adapt.optim, k)
        batch = {"labeled": src}
    amp = spec["amp"]

    def step() -> None:
        cores.rebalance()
        with autocast(device, amp):
            loss, _ = task.loss(batch, 0)
        with record_function("step/backward"):
            loss.backward()
        with record_function("step/optimizer"):
            for o in task.optimizers().values():
                o.step()
                o.zero_grad(set_to_none=True)
        task.after_step(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = rss_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS, to the current RSS
    time_passes = pass_timer(task, batch, device, amp)
    try:
        if spec.get("measure") == "memory":
            for _ in range(spec["warmup"] + spec["iters"]):
                step()
            return {**spec, "oom": False, **_peak_memory(device, base)}
        # The step and each pass alone, interleaved round by round, so that drifts of a shared machine (other
        # tenants, clocks) shift both sides of overhead_ratio alike instead of whichever ran later.
        times: dict[str, list[float]] = {}
        for i in range(spec["warmup"] + spec["iters"]):
            t = {"step": _timed(step, device), **time_passes()}
            if i >= spec["warmup"]:
                for name, v in t.items():
                    times.setdefault(name, []).append(v)
    except torch.cuda.OutOfMemoryError:
        return {**spec, "oom": True}
    out: dict[str, Any] = {**spec, "oom": False}
    out.update(s_per_iter=_median(times["step"]), s_per_iter_all=sorted(times["step"]))
    if device.type == "cuda":  # the allocator's own counters: no second process needed
        out.update(_peak_memory(device, base))
    out["parts_ms"] = profile_parts(step, device, max(3, spec["iters"] // 2))
    # The network passes of the step alone; what the step spends beyond their sum is overhead.
    out["passes_s"] = {name: _median(v) for name, v in times.items() if name != "step"}
    out["overhead_ratio"] = out["s_per_iter"] / sum(out["passes_s"].values())
    out["images_per_iter"] = {name: b["image"].shape[0] for name, b in batch.items()}
    return out


def _peak_memory(device: torch.device, base: int) -> dict[str, float]:
    """Peak memory of the steps run so far: CUDA max allocated/reserved, or the process's peak RSS (VmHWM)."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_allocated_mb=peak / 2**20, peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20)
    else:
        peak = rss_kb("VmHWM") * 1024
        out["peak_rss_mb"] = peak / 2**20
    out.update(baseline_mb=base / 2**20, peak_extra_mb=(peak - base) / 2**20)
    return out


def profile_parts(step, device: torch.device, steps: int) -> dict[str, float]:
    """Milliseconds per step in each named part (the task's and the step's record_function scopes; CPU time,
    or device time on CUDA), from torch.profiler over `steps` steps. Parts nest: stage1/source_forward_ce holds
    the source forward. The profiler slows ops a little: read shares, the timed s_per_iter is the figure."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
    parts = {}
    for ev in prof.key_averages():
        if ev.key.startswith(("stage1/", "step/")):
            t = ev.device_time_total if device.type == "cuda" else ev.cpu_time_total
            parts[ev.key] = t / 1000.0 / steps
    return dict(sorted(parts.items()))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one `fn()` call (CUDA: to its end on the device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def pass_timer(task: Any, batch: dict, device: torch.device, amp: bool) -> Callable[[], dict[str, float]]:
    """A function timing each network pass of the task's step on its own, once: the student forwards (one per
    domain, as the step runs them), the EMA forward (no grad; ProDA only) and the backward through the student
    forwards (from a plain sum of their outputs, so no loss is in it).

    The student forwards share one autocast region, as in the step: bf16 copies of the weights are made once
    per region and reused, so forwards in regions of their own would each pay the cast (and the backward would
    run through two of them), which on ResNet-101 made the passes alone outlast the whole step."""
    from pipeline.engine.loop import autocast

    net = task.modules()["model"]
    images = [b["image"] for b in batch.values()] if "labeled" in batch else [batch["source"]["image"]]
    names = ["student_forward"]
    if "target" in batch:
        t = batch["target"]
        images.append(torch.cat([t["weak_image"], t["image"]]))
        names = ["student_forward_source", "student_forward_target"]

    def build() -> torch.Tensor:
        with autocast(device, amp):
            total = torch.zeros((), device=device)
            for x in images:
                logits, feats = net(x)
                total = total + logits.float().mean() + feats.float().mean()
        return total

    def once() -> dict[str, float]:
        out: dict[str, float] = {}
        with autocast(device, amp):
            for name, x in zip(names, images, strict=True):
                out[name] = _timed(lambda x=x: net(x), device)
        if "target" in batch:
            ema, full = task.ema.module, batch["target"]["full"]

            def ema_forward() -> None:
                with torch.no_grad(), autocast(device, amp):
                    ema(full.float() / 255.0)

            out["ema_forward"] = _timed(ema_forward, device)
        graph = build()

        def backward() -> None:
            graph.backward()
            net.zero_grad(set_to_none=True)

        out["backward"] = _timed(backward, device)
        return out

    return once


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Times ``spec`` in one process (default allocator, as training runs) and, on the CPU, measures its peak
    RSS in another; returns the merged row."""
    timed = _run_process({**spec, "measure": "time"}, os.environ)
    if spec["device"] != "cpu" or timed["oom"]:
        return timed
    # Large blocks straight from/to the OS, so RSS tracks live tensors instead of glibc's free lists.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    mem = _run_process({**spec, "measure": "memory", "iters": min(spec["iters"], 3)}, env)
    return {**timed, **{k: mem[k] for k in ("peak_rss_mb", "baseline_mb", "peak_extra_mb")}}


def _run_process(spec: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------------------- driver
def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
        return
    ap = parser(__doc__, "adapt_cost")
    ap.add_argument("--configs", nargs="+", choices=["default", "paper"], help="default: default (+ paper on GPU)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="auto: the combinations above")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--set", metavar="KEY=YAML", action="append", default=[], help="params override, repeatable")
    args = ap.parse_args()
    from pipeline.distributed import bf16_native

    if args.device == "auto":  # this CPU always; the GPU too when there is one
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    rows = []
    for device in devices:
        configs = args.configs or (["default", "paper"] if device == "cuda" else ["default"])
        for config in configs:
            cl = bench_params(args.params)["base"]["channels_last"]
            if args.amp != "auto":  # that setting alone, in the params' memory format
                combos = [(args.amp == "on", cl)]
            elif bf16_native(device):  # bf16 on and off with the params' memory format, bf16 with the other one
                combos = [(True, cl), (True, not cl), (False, cl)]
            else:  # amp would run fp32 there: both memory formats in fp32 instead
                print(f"{device}: no native bf16 kernels, so amp runs fp32; timing fp32 only", flush=True)
                combos = [(False, cl), (False, not cl)]
            for amp, channels_last in combos:
                pair = {}
                for task in ("supervised", "proda"):
                    spec = dict(
                        config=config,
                        params=str(args.params),
                        task=task,
                        amp=amp,
                        channels_last=channels_last,
                        device=device,
                        iters=args.iters,
                        warmup=args.warmup,
                        overrides=parse_sets(args.set),
                    )
                    print(f"running {spec}", flush=True)
                    pair[task] = run_worker(spec)
                ok = not (pair["proda"]["oom"] or pair["supervised"]["oom"])
                ratio = pair["proda"]["s_per_iter"] / pair["supervised"]["s_per_iter"] if ok else None
                pair["proda"]["time_ratio_vs_supervised"] = ratio
                rows += [pair["supervised"], pair["proda"]]

    def onoff(flag: bool) -> str:
        return "on" if flag else "off"

    def cells(r: dict) -> list[str]:
        if r["oom"]:
            return ["OOM", "", "", "", "", ""]
        ratio = r.get("time_ratio_vs_supervised")
        peak = r.get("peak_allocated_mb", r.get("peak_rss_mb"))
        passes = sum(r["passes_s"].values())
        return [
            f"{r['s_per_iter']:.3f}",
            f"{passes:.3f}",
            f"{r['overhead_ratio']:.2f}",
            f"{ratio:.2f}" if ratio else "",
            f"{peak:.0f}",
            f"{r['peak_extra_mb']:.0f}",
        ]

    print(
        f"per training iteration, median of {args.iters}; passes = network forwards + backward alone, "
        "overhead = s/iter / passes; peak MiB: CUDA max allocated, CPU process RSS"
    )
    for r in rows:
        if not r["oom"]:
            print(
                f"  {r['device']} {r['config']} {r['task']} AMP {onoff(r['amp'])} NHWC {onoff(r['channels_last'])}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in r["passes_s"].items())
            )
            print("    parts (ms/step, profiled): " + ", ".join(f"{k} {v:.1f}" for k, v in r["parts_ms"].items()))
    print(
        table(
            [
                "device",
                "config",
                "task",
                "AMP",
                "NHWC",
                "s/iter",
                "passes s",
                "overhead",
                "x supervised",
                "peak MiB",
                "extra MiB",
            ],
            [
                [r["device"], r["config"], r["task"], onoff(r["amp"]), onoff(r["channels_last"]), *cells(r)]
                for r in rows
            ],
        )
    )
    goal = None
    paper = [r for r in rows if r["config"] == "paper" and r["task"] == "proda" and r["device"] == "cuda"]
    if paper:
        goal = {
            ("bf16" if r["amp"] else "fp32") + ("/nhwc" if r["channels_last"] else ""): (
                not r["oom"] and r["peak_allocated_mb"] < BUDGET_GIB * 1024
            )
            for r in paper
        }
        print(f"paper stage-1 batch within {BUDGET_GIB} GiB (max_memory_allocated): {goal}")
    write_result(
        args.out,
        {
            "params": str(args.params),
            "devices": devices,
            "iters": args.iters,
            "warmup": args.warmup,
            "rows": rows,
            "goal_fits_24gib": goal,
        },
    )


if __name__ == "__main__":
    main()
