"""Scaling: the embedded default with 1x, 2x and 4x images (`data.embedded.n_source`, `n_target_train`,
`n_target_val` multiplied), wall time per stage of `dvc repro` for each, to show how cost grows with data.

Training stages run a fixed number of iterations (--iters for warmup, oracle, adapt and distill; 0 keeps
params.yaml's), because their cost grows with iterations, not with the number of images: what grows with the
data is generation, validation, the per-image passes (pseudo labels, prototypes, teachers) and evaluation.
So the training rows stay roughly flat across factors, apart from their final evaluation on target val.

One workspace serves all factors (params.yaml rewritten, `dvc repro` reruns what the change invalidates,
which here is every stage). Time per stage is measured as in bench_pipeline.py.

    python bench/bench_scaling.py [--factors 1 2 4] [--iters 10] [--workdir DIR] [--until STAGE]
"""

from __future__ import annotations

from pathlib import Path

from common import bench_params, keep_dir, make_workspace, parser, table, timed_repro, write_params, write_result

COUNTS = ("n_source", "n_target_train", "n_target_val")
TRAINING = ("warmup", "oracle", "adapt", "distill")


def scaled(path: Path, factor: int, iters: int) -> dict:
    params = bench_params(path)
    emb = params["data"]["embedded"]
    for key in COUNTS:
        emb[key] *= factor
    if iters:
        for section in TRAINING:
            params[section]["optim"]["iters"] = iters
    return params


def main() -> None:
    ap = parser(__doc__, "scaling")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4], help="image-count multipliers")
    ap.add_argument("--iters", type=int, default=10, help="iterations of every training stage (0: params.yaml's)")
    ap.add_argument("--workdir", type=Path, help="new or empty folder for the workspace (default: a temp dir, kept)")
    ap.add_argument("--until", help="`dvc repro STAGE`: that stage and its upstream only (default: the whole DAG)")
    args = ap.parse_args()

    root = make_workspace(keep_dir(args.workdir, "scaling"), scaled(args.params, args.factors[0], args.iters))
    runs, images = {}, {}
    for f in args.factors:
        params = scaled(args.params, f, args.iters)
        write_params(root, params)
        images[str(f)] = {k: params["data"]["embedded"][k] for k in COUNTS}
        print(f"{f}x: {images[str(f)]}, dvc repro in {root}", flush=True)
        runs[str(f)] = timed_repro(root, [args.until] if args.until else [], log=root / f"repro_{f}x.log")

    first, last = str(args.factors[0]), str(args.factors[-1])
    names = list(dict.fromkeys(n for r in runs.values() for n in r["stages"]))
    rows = []
    for name in [*names, "total"]:
        secs = [r["total_s"] if name == "total" else r["stages"].get(name) for r in runs.values()]
        a, b = secs[0], secs[-1]
        rows.append([name, *(f"{s:.1f}" if s is not None else "" for s in secs), f"{b / a:.2f}" if a and b else ""])
    print(f"wall seconds per stage; training stages at {args.iters or 'params.yaml'} iterations")
    print(table(["stage", *(f"{f}x" for f in args.factors), f"{last}x / {first}x"], rows))
    write_result(
        args.out,
        {
            "params": str(args.params),
            "workspace": str(root),
            "factors": args.factors,
            "iters": args.iters,
            "until": args.until,
            "images": images,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
