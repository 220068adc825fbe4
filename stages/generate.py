"""Stage `generate`: write the embedded procedural dataset (GTA5-layout source, Cityscapes-layout target).

With `data.embedded: null` (real datasets) it writes only a note, so the DAG stays the same for every preset.
Usage: python -m stages.generate --out data/embedded
"""

from pathlib import Path

from pipeline.config import Params
from pipeline.engine.context import Context
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.orchestration.flows import StageRun


def check_roots(params: Params, out: Path) -> None:
    """With data.embedded set, the source/target roots must be the generated folders (else nothing uses them)."""
    for key, dom, kind in (("source", params.data.source, "gta5"), ("target", params.data.target, "cityscapes")):
        want = out / key
        if Path(dom.root) != want or dom.kind != kind:
            raise ValueError(
                f"data.{key}: with data.embedded set, the {key} must be kind '{kind}' at '{want}' "
                f"(the generated data); set data.embedded to null to use other data"
            )


def main(ctx: Context, params: Params, out: Path) -> dict | None:
    emb = params.data.embedded
    if emb is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "NOT_USED.txt").write_text("data.embedded is null: this run uses the dataset roots in params.\n")
        return None
    check_roots(params, out)
    from pipeline.data.synth import generate

    summary = ctx.step("generate", generate, out, emb.synth_config())
    return summary.get("counts", summary)


if __name__ == "__main__":
    ap = stage_parser(__doc__)
    ap.add_argument("--out", type=Path, required=True, help="folder of the generated source/ and target/")
    args = ap.parse_args()
    run_stage("generate", lambda ctx, params: main(ctx, params, args.out), args.params, runner=StageRun.for_stage)
