"""Stage `prepare`: validate the dataset roots and write manifests (file lists, per-class pixel counts)."""

from pipeline.datasets import prepare_manifests
from pipeline.runtime import MANIFESTS, Context, write_json
from pipeline.stage import run_stage


def main(ctx: Context) -> dict:
    summary = ctx.step("validate", prepare_manifests, ctx.params.data, MANIFESTS, ctx.class_names)
    write_json("metrics/prepare.json", summary)
    return summary


if __name__ == "__main__":
    run_stage("prepare", main)
