"""Stage `warmup`: source training (optionally with output-space adversarial alignment), then optionally
target BatchNorm statistics (`warmup.target_bn`), keeping the model as trained as the source-only row.

Usage: python -m stages.warmup --manifests data/manifests --out models/warmup --metrics metrics/warmup.json
       --plots plots/warmup
"""

import argparse
from functools import partial

from pipeline.config import Params
from pipeline.engine.context import Context, Data
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.methods.supervised import align_bn_to_target, train_supervised
from pipeline.orchestration.flows import StageRun
from stages.common import training_args, training_outputs


def main(ctx: Context, params: Params, args: argparse.Namespace) -> dict | None:
    data, out, eval_batch = Data(params.data, args.manifests), training_outputs(args), params.evaluate.batch_size
    metrics = train_supervised(ctx, data, params.warmup, params.model, "source", out, eval_batch)
    if params.warmup.target_bn:
        # Rank 0 only (other ranks get None); the stages after this one read the file it writes.
        metrics = ctx.step("target_bn", align_bn_to_target, ctx, data, out.models, out.metrics, eval_batch)
    return metrics


if __name__ == "__main__":
    args = training_args(stage_parser(__doc__)).parse_args()
    run_stage("warmup", partial(main, args=args), args.params, [args.metrics], StageRun.for_stage)
