"""Two jobs on the same cores: one training step's time alone and with a second identical process beside it.

What a user meets with `dvc queue start -j 2`, tests beside a run, or two stages at once: OpenMP threads of two
processes can spin against each other. Each measurement is `bench_adapt_cost.py`'s worker (the real task's
step on one batch, median of `--iters` timed steps after `--warmup`), run once alone and then as two processes
started together; `ratio` = together / alone (goal of issue 31: <= 2.5 on 2 cores, while the lone job stays as
fast as without any setting). Workers join the pipeline's core sharing as a stage does (`pipeline/cores.py`;
`--threads N` fixes N threads instead, the behaviour before it).
`--env KEY=VALUE` (repeatable) sets an environment variable for the workers, to
measure a lever, e.g. `--env OMP_WAIT_POLICY=PASSIVE` or `--env OMP_NUM_THREADS=1`.

    python bench/bench_contention.py [--task supervised|proda] [--iters 20] [--threads N] [--env KEY=VALUE ...]
        [--params FILE] [--out bench/results/contention.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import parser, write_result

WORKER = Path(__file__).resolve().parent / "bench_adapt_cost.py"


def start(spec: dict[str, Any], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), "--worker", json.dumps(spec)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> float:
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    return float(json.loads(lines[-1][len("RESULT ") :])["s_per_iter"])


def measure(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    alone = finish(start(spec, env))
    pair = [start(spec, env), start(spec, env)]
    together = [finish(p) for p in pair]
    mean = sum(together) / len(together)
    return {"alone_s": alone, "together_s": mean, "together_each_s": together, "ratio": mean / alone}


def main() -> None:
    ap = parser(__doc__, "contention")
    ap.add_argument("--task", choices=["supervised", "proda"], default="supervised")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per process (median)")
    # Untimed steps first: long enough for the workers to see each other (pipeline/cores.py re-reads the job
    # registry every 2 s), as they do within a stage's first seconds.
    ap.add_argument("--warmup", type=int, default=40, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0, help="base.threads (0: shared; N: fixed, no sharing)")
    ap.add_argument("--env", metavar="KEY=VALUE", action="append", default=[], help="worker environment, repeatable")
    args = ap.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    spec = {
        "config": "default",
        "params": str(args.params),
        "task": args.task,
        "amp": True,
        "device": "cpu",
        "iters": args.iters,
        "warmup": args.warmup,
        "measure": "time",
        "overrides": {"base.threads": args.threads},
    }
    result = measure(spec, {**os.environ, **extra})
    print(
        f"{args.task} step alone {result['alone_s']:.3f} s, two processes together {result['together_s']:.3f} s "
        f"(ratio {result['ratio']:.2f}); environment {extra or 'as given'}"
    )
    write_result(args.out, {"task": args.task, "env": extra, "threads": args.threads, "iters": args.iters, **result})


if __name__ == "__main__":
    main()
