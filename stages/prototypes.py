"""Stage `prototypes`: class prototypes [K x D] from the warm-up model's features and its pseudo labels.

Usage: python -m stages.prototypes --manifests data/manifests --model models/warmup/last.pt
       --labels pseudo/warmup.zarr --out models/prototypes.pt --metrics metrics/prototypes.json
"""

import argparse
from functools import partial
from pathlib import Path

from pipeline.config import Params
from pipeline.engine.context import Context, Data, load_model
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.files import write_json
from pipeline.methods.pseudo_labels import init_prototypes
from pipeline.orchestration.flows import StageRun


def main(ctx: Context, params: Params, args: argparse.Namespace) -> dict | None:
    if not ctx.info.is_main:
        return None
    p = params.prototypes
    data = Data(params.data, args.manifests)
    model = load_model(args.model, ctx)
    bank = ctx.step("init", init_prototypes, ctx, data, model, args.labels, p.min_pixels, p.batch_size)
    bank.save(args.out, ctx.class_names)
    empty = [n for n, ok in zip(ctx.class_names, bank.initialized.tolist()) if not ok]
    summary = {"initialized": int(bank.initialized.sum()), "empty_classes": empty}
    write_json(args.metrics, summary)
    return summary


if __name__ == "__main__":
    ap = stage_parser(__doc__)
    ap.add_argument("--manifests", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="model file of the warm-up")
    ap.add_argument("--labels", type=Path, required=True, help="the warm-up's pseudo-label store")
    ap.add_argument("--out", type=Path, required=True, help="prototype file to write")
    ap.add_argument("--metrics", type=Path, required=True)
    args = ap.parse_args()
    run_stage("prototypes", partial(main, args=args), args.params, [args.metrics], StageRun.for_stage)
