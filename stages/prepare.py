"""Stage `prepare`: validate the dataset roots and write manifests (file lists, per-class pixel counts).

Usage: python -m stages.prepare --out data/manifests --metrics metrics/prepare.json
"""

from pathlib import Path

from pipeline.config import Params
from pipeline.data.datasets import prepare_manifests
from pipeline.engine.context import Context
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.files import write_json
from pipeline.orchestration.flows import StageRun


def main(ctx: Context, params: Params, out: Path, metrics: Path) -> dict:
    summary = ctx.step("validate", prepare_manifests, params.data, out, ctx.class_names)
    write_json(metrics, summary)
    return summary


if __name__ == "__main__":
    ap = stage_parser(__doc__)
    ap.add_argument("--out", type=Path, required=True, help="folder of the manifests")
    ap.add_argument("--metrics", type=Path, required=True)
    args = ap.parse_args()
    run_stage(
        "prepare",
        lambda ctx, params: main(ctx, params, args.out, args.metrics),
        args.params,
        [args.metrics],
        StageRun.for_stage,
    )
