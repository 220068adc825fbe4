"""Stage `oracle`: the same engine trained on target-train labels; the upper bound of the final report
(``oracle.enabled: false`` for a target without train labels: a note instead of a model).

Usage: python -m stages.oracle --manifests data/manifests --out models/oracle --metrics metrics/oracle.json
       --plots plots/oracle
"""

import argparse

from pipeline.config import Params
from pipeline.engine.context import Context, Data
from pipeline.methods.supervised import train_oracle
from pipeline.orchestration.stage import run_stage, stage_parser
from stages.common import training_args, training_outputs


def main(ctx: Context, params: Params, args: argparse.Namespace) -> dict:
    data = Data(params.data, args.manifests)
    out = training_outputs(args)
    return train_oracle(ctx, data, params.oracle, params.model, out, params.evaluate.batch_size)


if __name__ == "__main__":
    args = training_args(stage_parser(__doc__)).parse_args()
    run_stage("oracle", lambda ctx, params: main(ctx, params, args), args.params, [args.metrics])
