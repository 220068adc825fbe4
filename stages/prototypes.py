"""Stage `prototypes`: class prototypes [K x D] from the warm-up model's features and its pseudo labels."""

from pathlib import Path

from pipeline.inference import init_prototypes
from pipeline.runtime import Context, load_model, write_json
from pipeline.stage import run_stage

MODEL = Path("models/warmup/last.pt")
STORE = Path("pseudo/warmup.zarr")
OUT = Path("models/prototypes.pt")


def main(ctx: Context) -> dict | None:
    if not ctx.info.is_main:
        return None
    p = ctx.params.prototypes
    bank = ctx.step("init", init_prototypes, ctx, load_model(MODEL, ctx), STORE, p.min_pixels, p.batch_size)
    bank.save(OUT, ctx.class_names)
    empty = [n for n, ok in zip(ctx.class_names, bank.initialized.tolist()) if not ok]
    summary = {"initialized": int(bank.initialized.sum()), "empty_classes": empty}
    write_json("metrics/prototypes.json", summary)
    return summary


if __name__ == "__main__":
    run_stage("prototypes", main)
