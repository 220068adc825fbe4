"""Pipeline overhead: wall time per stage of a full `dvc repro` of the default run, a no-op `dvc repro`,
and Prefect's start-up cost per stage process.

1. A fresh git + DVC workspace with params.yaml (or --params FILE), `dvc repro` with every output line timestamped:
   a stage's time is from its `Running stage` line to the next (so it includes DVC hashing/caching its outputs).
2. `dvc repro` again with nothing changed: median of --noop-repeat runs (status checks of every stage).
3. Prefect: bench/bench_prefect_overhead.py's measurement (a trivial stage through `StageRun` vs the same work
   plain, fresh processes) for the chosen modes; `server` starts a temporary local Prefect server.

Stages run with the caller's environment: when PREFECT_API_URL points at a live server, step 1 includes the
Prefect reporting (the JSON records whether it was set).

    python bench/bench_pipeline.py [--out bench/results/pipeline.json] [--workdir DIR] [--until STAGE]
    python bench/bench_pipeline.py --reuse DIR    # a finished workspace (e.g. a bench_accuracy seed): steps 2-3 only
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import bench_prefect_overhead as bpo
from common import bench_params, keep_dir, make_workspace, noop_repro, parser, table, timed_repro, write_result

MODES = ("no-server-unset", "no-server-dead-url", "server")


def prefect_overhead(modes: list[str], repeat: int) -> dict:
    """Overhead of `StageRun` per stage process in each mode (see bench_prefect_overhead.py)."""
    rows, server_start = [], None
    with tempfile.TemporaryDirectory(prefix="bench-prefect-") as tmp:
        tmp_path = Path(tmp)
        stage, baseline = tmp_path / "stage.py", tmp_path / "baseline.py"
        stage.write_text(bpo.STAGE)
        baseline.write_text(bpo.BASELINE)
        env = bpo.clean_env(tmp_path / "prefect-home")
        for mode in modes:
            if mode == "no-server-unset":
                rows.append(bpo.measure(mode, stage, baseline, env, repeat))
            elif mode == "no-server-dead-url":
                dead = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{bpo.free_port()}/api"}
                rows.append(bpo.measure(mode, stage, baseline, dead, repeat))
            else:
                t0 = time.perf_counter()
                proc, url = bpo.start_server(env, bpo.free_port())
                server_start = round(time.perf_counter() - t0, 2)
                try:
                    rows.append(bpo.measure(mode, stage, baseline, {**env, "PREFECT_API_URL": url}, repeat))
                finally:
                    bpo.stop_server(proc)
    return {"repeat": repeat, "server_start_s": server_start, "rows": rows}


def main() -> None:
    ap = parser(__doc__, "pipeline")
    ap.add_argument("--workdir", type=Path, help="new or empty folder for the workspace (default: a temp dir, kept)")
    ap.add_argument("--reuse", type=Path, help="finished workspace: skip the full repro, measure no-op + Prefect")
    ap.add_argument("--until", help="`dvc repro STAGE`: that stage and its upstream only (default: the whole DAG)")
    ap.add_argument("--noop-repeat", type=int, default=3, help="no-op `dvc repro` runs (median reported)")
    ap.add_argument("--prefect-repeat", type=int, default=7, help="runs per Prefect cell; 0 skips Prefect")
    ap.add_argument("--prefect-modes", nargs="+", choices=MODES, default=list(MODES))
    args = ap.parse_args()

    targets = [args.until] if args.until else []
    if args.reuse:
        root, full = args.reuse.resolve(), None
    else:
        root = make_workspace(keep_dir(args.workdir, "pipeline"), bench_params(args.params))
        print(f"workspace: {root}", flush=True)
        full = timed_repro(root, targets, log=root / "repro.log")
    noop = noop_repro(root, args.noop_repeat, targets) if args.noop_repeat > 0 else None
    prefect = prefect_overhead(args.prefect_modes, args.prefect_repeat) if args.prefect_repeat > 0 else None

    if full:
        total = full["total_s"]
        rows = [[name, f"{s:.1f}", f"{100 * s / total:.0f}%"] for name, s in full["stages"].items()]
        dvc_s = full["dvc_overhead_s"]
        rows += [["(dvc start-up and checks)", f"{dvc_s:.1f}", f"{100 * dvc_s / total:.0f}%"]]
        rows += [["total `dvc repro`", f"{total:.1f}", "100%"]]
        print(table(["stage", "wall s", "share"], rows))
    if noop:
        print(f"\nno-op `dvc repro`: {noop['median_s']:.2f} s (median of {len(noop['runs_s'])})")
    if prefect:
        print("\nPrefect overhead per stage process (StageRun stage - same work plain), seconds:")
        print(
            table(
                ["mode", "wall median", "wall min", "CPU median"],
                [
                    [
                        r["mode"],
                        f"{r['overhead_wall_median_s']:.2f}",
                        f"{r['overhead_wall_min_s']:.2f}",
                        f"{r['overhead_cpu_median_s']:.2f}",
                    ]
                    for r in prefect["rows"]
                ],
            )
        )
        if prefect["server_start_s"] is not None:
            print(f"local Prefect server ready after {prefect['server_start_s']:.1f} s")
    write_result(
        args.out,
        {
            "params": str(args.params),
            "workspace": str(root),
            "until": args.until,
            "prefect_api_url_set": bool(os.environ.get("PREFECT_API_URL")),
            "repro": full,
            "noop_repro": noop,
            "prefect": prefect,
        },
    )


if __name__ == "__main__":
    main()
