"""Stage `evaluate`: re-evaluates every stage's model on target val and writes the run's report.

Outputs: metrics/evaluate.json, plots/evaluate/{miou_by_stage,per_class}.csv, reports/report.md,
reports/confusion.png, reports/confusion_counts.csv, reports/overlays.png.
"""

from pipeline.report import build_report, write_outputs
from pipeline.runtime import Context
from pipeline.stage import run_stage
from pipeline.summary import format_summary


def main(ctx: Context) -> None:
    # Every rank evaluates its shard (engine.evaluate reduces the counts); only rank 0 writes.
    report = build_report(ctx)
    if ctx.info.is_main:
        print(format_summary(write_outputs(report)), flush=True)


if __name__ == "__main__":
    run_stage("evaluate", main)
