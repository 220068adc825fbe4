"""Stage `warmup`: source training (optionally with output-space adversarial alignment), then optionally
target BatchNorm statistics (`warmup.target_bn`), keeping the model as trained as the source-only row."""

from pathlib import Path

from pipeline.runtime import Context
from pipeline.stage import run_stage
from pipeline.supervised import align_bn_to_target, train_supervised


def main(ctx: Context) -> dict | None:
    metrics = train_supervised(ctx, "source")
    if ctx.params.warmup.target_bn:
        # Rank 0 only (other ranks get None); the stages after this one read the file it writes.
        metrics = ctx.step("target_bn", align_bn_to_target, ctx, Path("models/warmup"), Path("metrics/warmup.json"))
    return metrics


if __name__ == "__main__":
    run_stage("warmup", main)
