"""Stage `warmup`: source-only training (optionally with output-space adversarial alignment)."""

from pipeline.stage import run_stage
from pipeline.supervised import train_supervised

if __name__ == "__main__":
    run_stage("warmup", lambda ctx: train_supervised(ctx, "source"))
