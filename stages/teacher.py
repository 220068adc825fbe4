"""Stage `teacher@r`: flip-averaged hard labels + confidences (+ soft) of target train from round r's teacher.

Usage: python -m stages.teacher <round>. The confidence threshold is applied by the consumer (distill@r);
the store keeps every pixel.
"""

import sys
from pathlib import Path

from pipeline.inference import store_quality, write_pseudo_labels
from pipeline.runtime import Context, load_model
from pipeline.stage import run_stage


def main(ctx: Context, r: int) -> dict | None:
    if not ctx.info.is_main:
        return None
    rounds = ctx.params.distill.rounds
    if r not in rounds:
        raise ValueError(f"round {r} is not in distill.rounds {sorted(rounds)}")
    p = ctx.params.teacher
    model_path = Path(rounds[r].teacher) / "last.pt"
    store = Path(f"pseudo/teacher_{r}.zarr")
    model = load_model(model_path, ctx)
    timing = ctx.step(
        "predict",
        write_pseudo_labels,
        ctx,
        model,
        model_path,
        store,
        batch_size=p.batch_size,
        flip=p.flip,
        store_soft=p.store_soft,
        soft_dtype=p.soft_dtype,
    )
    q = ctx.step(
        "quality",
        store_quality,
        ctx,
        store,
        p.conf_threshold,
        Path(f"metrics/teacher_{r}.json"),
        Path(f"plots/teacher_{r}/per_class.csv"),
    )
    return {"throughput": timing, "quality": q and {k: q[k] for k in ("coverage", "pixel_acc", "miou")}}


if __name__ == "__main__":
    r = int(sys.argv[1])
    run_stage(f"teacher@{r}", lambda ctx: main(ctx, r))
