"""Stage `generate`: write the embedded procedural dataset (GTA5-layout source, Cityscapes-layout target).

With `data.embedded: null` (real datasets) it writes only a note, so the DAG stays the same for every preset.
"""

from pathlib import Path

from pipeline.config import EMBEDDED_ROOT
from pipeline.runtime import Context
from pipeline.stage import run_stage

OUT = Path(EMBEDDED_ROOT)


def main(ctx: Context) -> None:
    emb = ctx.params.data.embedded
    if emb is None:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "NOT_USED.txt").write_text("data.embedded is null: this run uses the dataset roots in params.\n")
        return
    from pipeline.synth import generate

    summary = generate(OUT, emb.synth_config())
    print(f"[generate] {summary.get('counts', summary)}", flush=True)


if __name__ == "__main__":
    run_stage("generate", main)
