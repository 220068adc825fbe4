"""Stage `distill@r`: KD round r; a student learns from teacher@r's labels. Usage: python -m stages.distill <r>."""

import sys

from pipeline.distill import train_distill
from pipeline.stage import run_stage

if __name__ == "__main__":
    r = int(sys.argv[1])
    run_stage(f"distill@{r}", lambda ctx: train_distill(ctx, r))
