"""Stage `distill@r`: KD round r; a student learns from teacher@r's labels.

Usage: python -m stages.distill --round 1 --manifests data/manifests --teacher models/adapt/last.pt
       --labels pseudo/teacher_1.zarr --out models/distill_1 --metrics metrics/distill_1.json
       --plots plots/distill_1
"""

import argparse
from functools import partial
from pathlib import Path

from pipeline.config import Params
from pipeline.engine.context import Context, Data
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.methods.distill import train_distill
from pipeline.orchestration.flows import StageRun
from stages.common import training_args, training_outputs


def main(ctx: Context, params: Params, args: argparse.Namespace) -> dict:
    if args.round not in params.distill.rounds:
        raise ValueError(f"--round {args.round} is not in distill.rounds {sorted(params.distill.rounds)}")
    data = Data(params.data, args.manifests)
    out = training_outputs(args)
    p = params.distill
    return train_distill(ctx, data, p, args.round, args.teacher, args.labels, out, params.evaluate.batch_size)


if __name__ == "__main__":
    ap = training_args(stage_parser(__doc__))
    ap.add_argument("--round", type=int, required=True, help="KD round (seeds its target stream, names the run)")
    ap.add_argument("--teacher", type=Path, required=True, help="model file of the round's teacher")
    ap.add_argument("--labels", type=Path, required=True, help="the teacher's pseudo-label store")
    args = ap.parse_args()
    run_stage(f"distill@{args.round}", partial(main, args=args), args.params, [args.metrics], StageRun.for_stage)
