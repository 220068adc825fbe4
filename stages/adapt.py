"""Stage `adapt` (ProDA stage 1): prototypical pseudo-label denoising + target structure learning.

Usage: python -m stages.adapt --manifests data/manifests --model models/warmup/last.pt
       --labels pseudo/warmup.zarr --prototypes models/prototypes.pt --out models/adapt
       --metrics metrics/adapt.json --rectified-metrics metrics/adapt_rectified.json --plots plots/adapt
"""

import argparse
from functools import partial
from pathlib import Path

from pipeline.config import Params
from pipeline.engine.context import Context, Data
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.methods.proda import train_adapt
from pipeline.orchestration.flows import StageRun
from stages.common import training_args, training_outputs


def main(ctx: Context, params: Params, args: argparse.Namespace) -> dict:
    data = Data(params.data, args.manifests)
    out = training_outputs(args)
    return train_adapt(
        ctx,
        data,
        params.adapt,
        args.model,
        args.labels,
        args.prototypes,
        out,
        args.rectified_metrics,
        params.evaluate.batch_size,
    )


if __name__ == "__main__":
    ap = training_args(stage_parser(__doc__))
    ap.add_argument("--model", type=Path, required=True, help="model file of the warm-up")
    ap.add_argument("--labels", type=Path, required=True, help="the warm-up's soft pseudo-label store")
    ap.add_argument("--prototypes", type=Path, required=True, help="initial prototypes")
    ap.add_argument("--rectified-metrics", type=Path, required=True, help="raw vs rectified label quality JSON")
    args = ap.parse_args()
    run_stage(
        "adapt", partial(main, args=args), args.params, [args.metrics, args.rectified_metrics], StageRun.for_stage
    )
