"""Stage `generate`: write the embedded procedural dataset (GTA5-layout source, Cityscapes-layout target).

With `data.embedded: null` (real datasets) it writes only a note, so the DAG stays the same for every preset.
"""

from pathlib import Path

from pipeline.config import EMBEDDED_ROOT
from pipeline.runtime import Context
from pipeline.stage import run_stage

OUT = Path(EMBEDDED_ROOT)


def main(ctx: Context) -> dict | None:
    emb = ctx.params.data.embedded
    if emb is None:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "NOT_USED.txt").write_text("data.embedded is null: this run uses the dataset roots in params.\n")
        return None
    from pipeline.synth import generate

    summary = ctx.step("generate", generate, OUT, emb.synth_config())
    return summary.get("counts", summary)


if __name__ == "__main__":
    run_stage("generate", main)
