"""Stage `oracle`: the same engine trained on target-train labels; the upper bound of the final report."""

from pipeline.stage import run_stage
from pipeline.supervised import train_supervised

if __name__ == "__main__":
    run_stage("oracle", lambda ctx: train_supervised(ctx, "target_train"))
