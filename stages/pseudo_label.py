"""Stage `pseudo_label`: soft pseudo labels of target train from the warm-up model (zarr) + their quality."""

from pathlib import Path

from pipeline.inference import store_quality, write_pseudo_labels
from pipeline.runtime import Context, load_model
from pipeline.stage import run_stage

MODEL = Path("models/warmup/last.pt")
STORE = Path("pseudo/warmup.zarr")


def main(ctx: Context) -> dict | None:
    p = ctx.params.pseudo_label
    if not ctx.info.is_main:
        return None
    model = load_model(MODEL, ctx)
    timing = ctx.step(
        "predict",
        write_pseudo_labels,
        ctx,
        model,
        MODEL,
        STORE,
        batch_size=p.batch_size,
        flip=False,
        store_soft=True,
        soft_dtype=p.soft_dtype,
    )
    q = ctx.step(
        "quality",
        store_quality,
        ctx,
        STORE,
        p.quality_threshold,
        Path("metrics/pseudo_label.json"),
        Path("plots/pseudo_label/per_class.csv"),
        extra={"throughput": timing},
    )
    return {"throughput": timing, "quality": q and {k: q[k] for k in ("coverage", "pixel_acc", "miou")}}


if __name__ == "__main__":
    run_stage("pseudo_label", main)
