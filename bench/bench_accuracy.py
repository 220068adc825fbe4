"""Accuracy of the embedded default over seeds: mIoU on target val of source-only / warm-up, stage 1 (adapt), each
KD round and the oracle, and the gap closed = 100 (mIoU - source only) / (oracle - source only) in percent, as
mean ± std over seeds.

Each seed (`base.seed` and `data.embedded.seed`: other training randomness and other scenes) is a full
`dvc repro` in its own git + DVC workspace under --workdir (kept, so --reuse can aggregate them again). The
numbers are the evaluate stage's `metrics/evaluate.json`. Goal: the final stage (last KD round) closes >= 50%.

The gap is measured from the source-only row (`source_only`, the warm-up as trained on the source, present when
`warmup.target_bn` gives the warm-up target BatchNorm statistics), else from the warm-up, as the report does.

    python bench/bench_accuracy.py [--seeds 0 1 2] [--workdir DIR]     # run and aggregate
    python bench/bench_accuracy.py --set data.embedded.target_style.noise_std=14 ...   # another target style
    python bench/bench_accuracy.py --reuse DIR [DIR ...]               # aggregate existing runs only
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from common import (
    bench_params,
    keep_dir,
    make_workspace,
    mean_std,
    parse_sets,
    parser,
    seed_overrides,
    table,
    timed_repro,
    write_result,
)

EVALUATE = Path("metrics/evaluate.json")


def run_dirs(paths: list[Path]) -> list[Path]:
    """Workspaces among `paths`: each path is a workspace (has metrics/evaluate.json) or a folder of them."""
    out: list[Path] = []
    for p in paths:
        found = [p] if (p / EVALUATE).is_file() else sorted(d for d in p.iterdir() if (d / EVALUATE).is_file())
        if not found:
            raise SystemExit(f"no {EVALUATE} in {p} or its subfolders")
        out += found
    return out


def load_run(root: Path) -> dict[str, Any]:
    params = yaml.safe_load((root / "params.yaml").read_text()) if (root / "params.yaml").is_file() else {}
    return {
        "dir": str(root),
        "seed": params.get("base", {}).get("seed"),
        # aligned to the target: adversarially or by target BatchNorm statistics (AdaBN)
        "warmup_aligned": bool(params.get("warmup", {}).get("adversarial", {}).get("enabled", False))
        or bool(params.get("warmup", {}).get("target_bn", False)),
        "evaluate": json.loads((root / EVALUATE).read_text()),
    }


def report_order(names: list[str]) -> list[str]:
    """warmup, adapt, distill_1..N, oracle (evaluate.json is written with sorted keys)."""

    def key(n: str) -> tuple[int, int]:
        if n.startswith("distill_") and n[8:].isdigit():
            return 2, int(n[8:])
        return {"source_only": (-1, 0), "warmup": (0, 0), "adapt": (1, 0), "oracle": (3, 0)}.get(n, (4, 0))

    return sorted(names, key=key)


def values(evals: list[dict], section: str, name: str, key: str) -> list[float]:
    """evaluate.json's section[name][key] of every run that has it (null, e.g. no pixels kept, is skipped)."""
    return [v for e in evals if (v := e.get(section, {}).get(name, {}).get(key)) is not None]


def aggregate(runs: list[dict[str, Any]], goal: float) -> dict[str, Any]:
    """mean ± std per stage of mIoU, pixel accuracy and gap closed (null values, e.g. an undefined gap, skipped)."""
    evals = [r["evaluate"] for r in runs]
    stages: dict[str, Any] = {}
    for name in report_order(list(evals[0]["stages"])):
        miou, acc = values(evals, "stages", name, "miou"), values(evals, "stages", name, "pixel_acc")
        gap = [g for e in evals if (g := e["gap_closed"].get(name)) is not None]
        row: dict[str, Any] = {"miou_per_run": miou}
        row["miou_mean"], row["miou_std"] = mean_std(miou)
        row["pixel_acc_mean"], row["pixel_acc_std"] = mean_std(acc)
        if any(name in e["gap_closed"] for e in evals):
            row["gap_closed_per_run"] = gap
            row["gap_closed_mean"], row["gap_closed_std"] = mean_std(gap)
        stages[name] = row
    pseudo = {}
    for name in sorted(evals[0].get("pseudo_labels", {}), key=lambda n: (n != "warmup", n)):
        vals = values(evals, "pseudo_labels", name, "miou")
        pseudo[name] = dict(zip(("miou_mean", "miou_std"), mean_std(vals), strict=True))
    final = evals[0]["final_stage"]
    final_gap = stages.get(final, {}).get("gap_closed_mean")
    return {
        "stages": stages,
        "pseudo_labels": pseudo,
        "final_stage": final,
        "goal_gap_closed": goal,
        "goal_met": None if final_gap is None else final_gap >= goal,
        "warmup_aligned": any(r["warmup_aligned"] for r in runs),
    }


def pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}")


def label(name: str, aligned: bool) -> str:
    if name == "warmup":
        return "warm-up (aligned)" if aligned else "source-only = warm-up"
    names = {"source_only": "source only", "adapt": "stage 1 (adapt)", "oracle": "oracle (target labels)"}
    return names.get(name, name.replace("distill_", "KD round "))


def main() -> None:
    ap = parser(__doc__, "accuracy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed (default: 0 1 2)")
    ap.add_argument("--workdir", type=Path, help="folder for the seed_<s> workspaces (default: a temp dir, kept)")
    ap.add_argument("--reuse", type=Path, nargs="+", help="aggregate these existing runs instead of running")
    ap.add_argument("--goal", type=float, default=50.0, help="gap closed (%%) the final stage should reach")
    ap.add_argument(
        "--set",
        metavar="KEY=YAML",
        action="append",
        default=[],
        help="dotted params override applied to every seed, e.g. data.embedded.target_style.blur_sigma=1.5",
    )
    args = ap.parse_args()

    repro_s: dict[str, Any] = {}
    if args.reuse:
        dirs = run_dirs(args.reuse)
    else:
        workdir = keep_dir(args.workdir, "accuracy")
        dirs = []
        for seed in args.seeds:
            overrides = {**parse_sets(args.set), **seed_overrides(seed)}
            root = make_workspace(workdir / f"seed_{seed}", bench_params(args.params, overrides))
            print(f"seed {seed}: dvc repro in {root}", flush=True)
            repro_s[str(seed)] = timed_repro(root, log=root / "repro.log")
            dirs.append(root)
    runs = [load_run(d) for d in dirs]
    agg = aggregate(runs, args.goal)

    aligned = agg["warmup_aligned"]
    print(f"target val, {len(runs)} run(s), seeds {[r['seed'] for r in runs]}: mean ± std")
    print(
        table(
            ["model", "mIoU %", "pixel acc %", "gap closed %"],
            [
                [
                    label(n, aligned),
                    pm(s["miou_mean"], s["miou_std"]),
                    pm(s["pixel_acc_mean"], s["pixel_acc_std"]),
                    pm(s.get("gap_closed_mean"), s.get("gap_closed_std")) if "gap_closed_per_run" in s else "",
                ]
                for n, s in agg["stages"].items()
            ],
        )
    )
    if aligned and "source_only" not in agg["stages"]:
        print("note: the warm-up is adversarially aligned, so the gap is measured from an aligned baseline")
    quality = ", ".join(f"{n} {pm(q['miou_mean'], q['miou_std'])}" for n, q in agg["pseudo_labels"].items())
    print(f"pseudo-label mIoU % on target train: {quality}")
    final_gap = agg["stages"].get(agg["final_stage"], {}).get("gap_closed_mean")
    verdict = {True: "met", False: "NOT met", None: "undefined (no gap)"}[agg["goal_met"]]
    print(
        f"final stage {agg['final_stage']}: gap closed {pm(final_gap, None)}{'' if final_gap is None else '%'} "
        f"(goal >= {args.goal:g}%: {verdict})"
    )
    write_result(args.out, {"params": str(args.params), "runs": runs, "repro": repro_s or None, **agg})


if __name__ == "__main__":
    main()
