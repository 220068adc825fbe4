"""Ablation of ProDA stage 1 (the paper's Table 4 in spirit): each component switched off on its own.

For every finished default run given (e.g. the seed workspaces of bench_accuracy.py), each variant is a copy
of that workspace with one parameter changed and `dvc repro adapt`: only stage 1 reruns, on the same warm-up,
pseudo labels and prototypes. The full method's row is the run's own `metrics/adapt.json`. Target-val mIoU,
mean ± std over the runs given.

    python bench/bench_ablation.py --base /tmp/acc/seed_0 /tmp/acc/seed_1 --workdir /tmp/ablation
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from common import keep_dir, mean_std, parser, set_dotted, table, timed_repro, write_result

VARIANTS: dict[str, dict[str, Any]] = {
    "no prototypical rectification": {"adapt.rectify": False},
    "no structure KL": {"adapt.structure_kl.enabled": False},
    "CE instead of symmetric CE": {"adapt.target_ce.symmetric": False},
    "no regulariser": {"adapt.regulariser.enabled": False},
    "running BN statistics of both domains": {"adapt.target_bn": False},
}


def miou(root: Path, name: str) -> float:
    return json.loads((root / "metrics" / f"{name}.json").read_text())["miou"]


def variant_run(base: Path, root: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `overrides` in params.yaml; `dvc repro adapt` there."""
    shutil.copytree(base, root, symlinks=True, ignore=shutil.ignore_patterns(".resume", ".dvc_site"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in overrides.items():
        set_dotted(params, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    timing = timed_repro(root, ["adapt"], log=root / "repro.log")
    return {"miou": miou(root, "adapt"), "repro": timing}


def main() -> None:
    ap = parser(__doc__, "ablation")
    ap.add_argument("--base", type=Path, nargs="+", required=True, help="finished default runs (workspaces)")
    ap.add_argument("--workdir", type=Path, help="folder for the variant workspaces (default: a temp dir, kept)")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="a subset (default: all)")
    args = ap.parse_args()
    workdir = keep_dir(args.workdir, "ablation")
    names = args.variants or list(VARIANTS)

    rows: dict[str, list[float]] = {"full stage 1": [], **{n: [] for n in names}}
    baseline: dict[str, list[float]] = {"source_only": [], "warmup": []}
    runs: list[dict[str, Any]] = []
    for base in args.base:
        base = base.resolve()
        rows["full stage 1"].append(miou(base, "adapt"))
        warm = json.loads((base / "metrics" / "warmup.json").read_text())
        baseline["warmup"].append(warm["miou"])
        baseline["source_only"].append((warm.get("source_only") or warm)["miou"])
        for i, name in enumerate(names):
            root = workdir / base.name / f"v{i}"
            print(f"{base.name}: {name} -> {root}", flush=True)
            res = variant_run(base, root, VARIANTS[name])
            rows[name].append(res["miou"])
            runs.append({"base": str(base), "variant": name, "overrides": VARIANTS[name], **res})

    full = mean_std(rows["full stage 1"])[0]
    out_rows = []
    for label, vals in [("source only", baseline["source_only"]), ("warm-up", baseline["warmup"]), *rows.items()]:
        m, s = mean_std(vals)
        delta = "" if label in ("source only", "warm-up", "full stage 1") or m is None else f"{m - full:+.1f}"
        out_rows.append([label, f"{m:.1f}" + ("" if s is None else f" ± {s:.1f}"), delta])
    print(f"stage-1 ablation, target val mIoU %, {len(args.base)} run(s)")
    print(table(["model", "mIoU %", "vs full"], out_rows))
    write_result(args.out, {"bases": [str(b) for b in args.base], "rows": rows, "baseline": baseline, "runs": runs})


if __name__ == "__main__":
    main()
