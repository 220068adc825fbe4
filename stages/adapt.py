"""Stage `adapt` (ProDA stage 1): prototypical pseudo-label denoising + target structure learning."""

from pathlib import Path

from pipeline.adapt import train_adapt
from pipeline.stage import run_stage

if __name__ == "__main__":
    run_stage(
        "adapt",
        lambda ctx: train_adapt(
            ctx, Path("models/warmup/last.pt"), Path("pseudo/warmup.zarr"), Path("models/prototypes.pt")
        ),
    )
