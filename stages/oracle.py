"""Stage `oracle`: the same engine trained on target-train labels; the upper bound of the final report
(``oracle.enabled: false`` for a target without train labels: a note instead of a model).

Usage: python -m stages.oracle --manifests data/manifests --out models/oracle --metrics metrics/oracle.json
       --plots plots/oracle
"""

import argparse
from functools import partial

from pipeline.config import Params
from pipeline.engine.context import Context, Data
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.methods.supervised import train_oracle
from pipeline.orchestration.flows import StageRun
from stages.common import training_args, training_outputs


def main(ctx: Context, params: Params, args: argparse.Namespace) -> dict:
    data = Data(params.data, args.manifests)
    out = training_outputs(args)
    return train_oracle(ctx, data, params.oracle, params.model, out, params.evaluate.batch_size)


if __name__ == "__main__":
    args = training_args(stage_parser(__doc__)).parse_args()
    run_stage("oracle", partial(main, args=args), args.params, [args.metrics], StageRun.for_stage)
