"""Stage `pseudo_label`: soft pseudo labels of target train from the warm-up model (zarr) + their quality.

Usage: python -m stages.pseudo_label --manifests data/manifests --model models/warmup/last.pt
       --out pseudo/warmup.zarr --metrics metrics/pseudo_label.json --plots plots/pseudo_label
"""

import argparse
from functools import partial
from pathlib import Path

from pipeline.config import Params
from pipeline.engine.context import Context, Data, load_model
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.methods.pseudo_labels import store_quality, write_pseudo_labels
from pipeline.orchestration.flows import StageRun


def main(ctx: Context, params: Params, args: argparse.Namespace) -> dict | None:
    p = params.pseudo_label
    if not ctx.info.is_main:
        return None
    data = Data(params.data, args.manifests)
    model = load_model(args.model, ctx)
    timing = ctx.step(
        "predict",
        write_pseudo_labels,
        ctx,
        data,
        model,
        args.model,
        args.out,
        batch_size=p.batch_size,
        flip=False,
        store_soft=True,
        soft_dtype=p.soft_dtype,
        chunk_mb=p.chunk_mb,
    )
    q = ctx.step(
        "quality",
        store_quality,
        ctx,
        data,
        args.out,
        p.conf_threshold,
        args.metrics,
        args.plots / "per_class.csv",
        extra={"throughput": timing},
    )
    return {"throughput": timing, "quality": q and {k: q[k] for k in ("coverage", "pixel_acc", "miou")}}


if __name__ == "__main__":
    ap = stage_parser(__doc__)
    ap.add_argument("--manifests", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="model file of the warm-up")
    ap.add_argument("--out", type=Path, required=True, help="zarr store to write")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    args = ap.parse_args()
    run_stage("pseudo_label", partial(main, args=args), args.params, [args.metrics], StageRun.for_stage)
