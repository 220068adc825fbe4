"""The methods side by side on one engine: each method is a params change of the same DVC stages, run over seeds.

Per seed, one git + DVC workspace under --workdir (`seed_<s>`, kept): the default (ProDA) runs first with
`dvc repro`; then each other method writes its overrides over that seed's params and runs `dvc repro` in the same
workspace, so that DVC reruns only the stages the method changes and restores the rest from its run cache (the
warm-up, the oracle, the pseudo labels of the default are computed once per seed). Each method's
`metrics/evaluate.json` is kept as `methods/<name>/evaluate.json` in the workspace.

One table: method, final-model mIoU mean ± std, gap closed (from source only to the oracle), final − the AdaBN
warm-up of the same seed (the default's warm-up: the baseline every method must beat), pseudo-label coverage and
accuracy per round, wall time of the method's own stages, and the published GTA5 -> Cityscapes figure. The cost
of the benchmark against the sum of its methods' own stage times is reported too (issue 31's goal: <= 1.5x).

    python bench/bench_methods.py [--seeds 0 1 2] [--methods proda self-training ...] [--workdir DIR]
    python bench/bench_methods.py --reuse DIR          # aggregate the workspaces under DIR again
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    bench_params,
    keep_dir,
    make_workspace,
    mean_std,
    parser,
    seed_overrides,
    table,
    timed_repro,
    write_params,
    write_result,
)

EVALUATE = Path("metrics/evaluate.json")


@dataclass(frozen=True)
class Method:
    doc: str
    #: `dvc exp run -S` arguments over the default: the README's command for the method is these, and the
    #: benchmark applies them with DVC's own parser (tests/test_readme_dvc.py checks that both agree).
    sets: tuple[str, ...] = ()
    published: float | None = None  # GTA5 -> Cityscapes mIoU of the paper (ResNet-101 DeepLab-v2)


# Plain self-training as the KD chain: round 1's teacher is the AdaBN warm-up, no KD term, a second round.
SELF_TRAINING = (
    "distill.rounds.1.teacher=models/warmup",
    "distill.kd_beta=0",
    "+distill.rounds.2={teacher: models/distill_1, student_init: previous}",
)
CBST = (*SELF_TRAINING, "distill.selection.kind=class_balanced")

METHODS: dict[str, Method] = {
    "proda": Method("ProDA: warm-up (AdaBN), stage 1, KD round(s), the default", (), 57.5),
    "self-training": Method(
        "plain self-training: two rounds of hard pseudo labels with confidence >= 0.95 (teacher@r -> distill@r, "
        "no KD term) from the AdaBN warm-up",
        SELF_TRAINING,
    ),
    "cbst": Method(
        "CBST: the same rounds with class-balanced thresholds (each class keeps its top 20%, then 25%)",
        CBST,
        45.9,
    ),
    "crst": Method(
        "CRST (MRKLD): CBST + the confidence regulariser (weight 0.1)",
        (*CBST, "distill.regulariser.enabled=true"),
        47.1,
    ),
    "adaptsegnet": Method(
        "AdaptSegNet (output-space adversarial warm-up), then the ProDA stages from it",
        ("warmup.adversarial.enabled=true",),
        42.4,
    ),
}


def write_method_params(root: Path, base: dict, method: Method) -> None:
    """root/params.yaml = base with the method's -S arguments applied as `dvc exp run -S` applies them."""
    from dvc.utils.hydra import apply_overrides

    write_params(root, base)
    if method.sets:
        apply_overrides(str(root / "params.yaml"), list(method.sets))


def run_seed(root: Path, base: dict, names: list[str]) -> dict[str, Any]:
    """The methods in turn in one workspace; returns per method its evaluate.json, stage times and wall time."""
    out: dict[str, Any] = {}
    for name in names:
        write_method_params(root, base, METHODS[name])
        print(f"  {name}: dvc repro in {root}", flush=True)
        timing = timed_repro(root, log=root / f"repro_{name}.log")
        keep = root / "methods" / name
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / EVALUATE, keep / "evaluate.json")
        shutil.copy(root / "dvc.lock", keep / "dvc.lock")
        (keep / "timing.json").write_text(json.dumps(timing, indent=2))
        out[name] = {"timing": timing, "evaluate": json.loads((root / EVALUATE).read_text())}
    # The workspace's own params again, its outputs restored from DVC's run cache: the default's finished run.
    write_params(root, base)
    timed_repro(root, log=root / "repro_restore.log")
    return out


def reuse(workdir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    for ws in sorted(workdir.glob("seed_*")):
        done = {}
        for name in names:
            f = ws / "methods" / name / "evaluate.json"
            if f.is_file():
                t = f.with_name("timing.json")
                timing = json.loads(t.read_text()) if t.is_file() else None
                done[name] = {"timing": timing, "evaluate": json.loads(f.read_text())}
        runs[ws.name.removeprefix("seed_")] = done
    return runs


def row(name: str, per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One table row: the method's final model over the seeds that ran it, against each seed's AdaBN warm-up."""
    seeds = [s for s, r in per_seed.items() if name in r]
    finals, gaps, over_warmup, pseudo, wall, warmups = [], [], [], {}, [], []
    for s in seeds:
        e = per_seed[s][name]["evaluate"]
        final = e["final_stage"]
        finals.append(e["stages"][final]["miou"])
        warmups.append(e["stages"]["warmup"]["miou"])
        if (g := e["gap_closed"].get(final)) is not None:
            gaps.append(g)
        base = per_seed[s].get("proda", per_seed[s][name])["evaluate"]
        over_warmup.append(round(e["stages"][final]["miou"] - base["stages"]["warmup"]["miou"], 2))
        for store, q in e.get("pseudo_labels", {}).items():
            pseudo.setdefault(store, []).append(q)
        if (t := per_seed[s][name]["timing"]) is not None:
            wall.append(t["total_s"])
    m, sd = mean_std(finals)
    g, gsd = mean_std(gaps)
    return {
        "method": name,
        "doc": METHODS[name].doc,
        "seeds": seeds,
        "final_stage": per_seed[seeds[0]][name]["evaluate"]["final_stage"] if seeds else None,
        "miou_per_seed": finals,
        "miou_mean": m,
        "miou_std": sd,
        "warmup_miou_mean": mean_std(warmups)[0],
        "warmup_miou_per_seed": warmups,
        "gap_closed_mean": g,
        "gap_closed_std": gsd,
        "final_minus_adabn_warmup": over_warmup,
        "pseudo_labels": {
            k: {
                f"{key}_mean": mean_std([q[key] for q in v if q.get(key) is not None])[0]
                for key in ("coverage", "pixel_acc", "miou")
            }
            for k, v in sorted(pseudo.items())
        },
        "wall_s_per_seed": wall,
        "published_gta5_cityscapes": METHODS[name].published,
    }


def last_round_quality(r: dict[str, Any]) -> str:
    """Coverage / accuracy / mIoU (%) of the hard labels of the method's last round."""
    stores = r["pseudo_labels"]
    teachers = sorted((k for k in stores if k.startswith("teacher_")), key=lambda k: int(k.split("_")[1]))
    if not teachers:
        return ""
    q = stores[teachers[-1]]
    return " / ".join("—" if q[k] is None else f"{q[k]:.0f}" for k in ("coverage_mean", "pixel_acc_mean", "miou_mean"))


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | its warm-up | final mIoU | gap closed | final − AdaBN warm-up, per seed "
        "| last round's labels: coverage / acc. / mIoU | wall s a seed | paper, GTA5→CS |"
    )
    lines = [head, "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        wall = mean_std(r["wall_s_per_seed"])[0]
        lines.append(
            f"| {r['method']} | {pm(r['warmup_miou_mean'], None)} | {pm(r['miou_mean'], r['miou_std'])} "
            f"| {pm(r['gap_closed_mean'], r['gap_closed_std'])}{'' if r['gap_closed_mean'] is None else '%'} "
            f"| {', '.join(f'{d:+.1f}' for d in r['final_minus_adabn_warmup'])} | {last_round_quality(r)} "
            f"| {'' if wall is None else f'{wall:.0f}'} | {r['published_gta5_cityscapes'] or ''} |"
        )
    return "\n".join(lines)


def pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}")


def main() -> None:
    ap = parser(__doc__, "methods")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--workdir", type=Path, help="folder for the seed_<s> workspaces (default: a temp dir, kept)")
    ap.add_argument("--reuse", type=Path, help="aggregate the workspaces under this folder instead of running")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown (the README's)")
    args = ap.parse_args()
    names = ["proda"] + [n for n in args.methods if n != "proda"]  # the default first: the others reuse its stages

    t0 = time.perf_counter()
    if args.reuse:
        per_seed = reuse(args.reuse, names)
        workdir = args.reuse
    else:
        workdir = keep_dir(args.workdir, "methods")
        per_seed = {}
        for seed in args.seeds:
            base = bench_params(args.params, seed_overrides(seed))
            root = make_workspace(workdir / f"seed_{seed}", base)
            print(f"seed {seed}:", flush=True)
            per_seed[str(seed)] = run_seed(root, base, names)
    bench_s = time.perf_counter() - t0

    rows = [row(n, per_seed) for n in names]
    print(
        table(
            ["method", "its warm-up", "final mIoU %", "gap closed %", "final − AdaBN warm-up", "wall s/seed", "paper"],
            [
                [
                    r["method"],
                    pm(r["warmup_miou_mean"], None),
                    pm(r["miou_mean"], r["miou_std"]),
                    pm(r["gap_closed_mean"], r["gap_closed_std"]),
                    ", ".join(f"{d:+.1f}" for d in r["final_minus_adabn_warmup"]),
                    pm(*mean_std(r["wall_s_per_seed"])) if r["wall_s_per_seed"] else "",
                    r["published_gta5_cityscapes"] or "",
                ]
                for r in rows
            ],
        )
    )
    if args.markdown:
        print(markdown(rows))
    # Cost: the benchmark's wall time against what the methods' own stages took (the stages DVC ran).
    stage_s = sum(
        sum(m["timing"]["stages"].values()) for runs in per_seed.values() for m in runs.values() if m["timing"]
    )
    cost = None if args.reuse or not stage_s else bench_s / stage_s
    if cost is not None:
        print(f"benchmark {bench_s:.0f} s for {stage_s:.0f} s of stages run: {cost:.2f}x")
    write_result(
        args.out,
        {
            "params": str(args.params),
            "workdir": str(workdir),
            "methods": {n: {"doc": METHODS[n].doc, "sets": list(METHODS[n].sets)} for n in names},
            "rows": rows,
            "per_seed": per_seed,
            "bench_s": None if args.reuse else bench_s,
            "stages_s": stage_s or None,
            "cost_ratio": cost,
        },
    )


if __name__ == "__main__":
    main()
