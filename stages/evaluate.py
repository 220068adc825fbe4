"""Stage `evaluate`: re-evaluates every stage's model on target val and writes the run's report.

Usage: python -m stages.evaluate --manifests data/manifests --models models --pseudo pseudo
       --metrics metrics/evaluate.json --plots plots/evaluate --reports reports
The model and pseudo-label folders are laid out as dvc.yaml's stages write them: models/<stage>/last.pt,
pseudo/warmup.zarr, pseudo/teacher_<r>.zarr.
"""

import argparse
from functools import partial
from pathlib import Path

from pipeline.config import Params
from pipeline.engine.context import Context, Data
from pipeline.engine.stage import run_stage, stage_parser
from pipeline.methods.rounds import round_selection
from pipeline.orchestration.flows import StageRun
from pipeline.report.evaluation import ADAPT, ORACLE, SOURCE_ONLY, WARMUP, PseudoStore, StageModel, build_report
from pipeline.report.render import REPORT_MD, ReportOutputs, write_outputs
from pipeline.report.summary import format_summary


def stage_models(params: Params, models: Path) -> list[StageModel]:
    """The models of a run in report order: [source_only,] warmup, adapt, distill_1..N[, oracle].

    With ``warmup.target_bn`` the warm-up saw target images (their BatchNorm statistics), so the model as
    trained on the source is its own row, ``source_only``, and the gap is measured from it.
    """
    out = [StageModel(SOURCE_ONLY, WARMUP, models / "warmup", "source_only.pt", None)]
    out = out if params.warmup.target_bn else []
    out += [StageModel(WARMUP, WARMUP, models / "warmup"), StageModel(ADAPT, ADAPT, models / "adapt")]
    for r in sorted(params.distill.rounds):
        out.append(StageModel(f"distill_{r}", f"distill@{r}", models / f"distill_{r}"))
    if params.oracle.enabled:
        out.append(StageModel(ORACLE, ORACLE, models / "oracle"))
    return out


def final_stage(params: Params) -> str:
    """The model the run delivers: the last KD round, or the stage-1 model when there are no rounds."""
    rounds = params.distill.rounds
    return f"distill_{max(rounds)}" if rounds else ADAPT


def pseudo_stores(params: Params, pseudo: Path) -> list[PseudoStore]:
    """Stage-1 soft labels (used whole, so threshold 0) and each round's hard labels at the KD threshold."""
    out = [PseudoStore(WARMUP, "pseudo_label", pseudo / "warmup.zarr", 0.0)]
    sel, threshold = params.distill.selection, params.distill.conf_threshold
    for r in sorted(params.distill.rounds):
        path = pseudo / f"teacher_{r}.zarr"
        # The labels the round trained with: class-balanced thresholds are made from the store when it exists.
        selection = partial(round_selection, sel, threshold, r, path) if sel.kind == "class_balanced" else None
        out.append(PseudoStore(f"teacher_{r}", f"teacher@{r}", path, threshold, selection))
    return out


def main(ctx: Context, params: Params, args: argparse.Namespace) -> None:
    data = Data(params.data, args.manifests)
    ev = params.evaluate
    models, stores = stage_models(params, args.models), pseudo_stores(params, args.pseudo)
    # Every rank evaluates its shard (engine.evaluate reduces the counts); only rank 0 writes.
    report = build_report(ctx, data, models, stores, final_stage(params), ev.batch_size, ev.n_overlays)
    if ctx.info.is_main:
        out = ReportOutputs(metrics=args.metrics, plots=args.plots, reports=args.reports)
        metrics = write_outputs(report, out)
        print(format_summary(metrics), flush=True)
        publish_report(ctx, metrics, args.reports / REPORT_MD)


def publish_report(ctx: Context, metrics: dict, report_md: Path) -> None:
    """The final table and the Markdown report as Prefect artifacts of the flow run (nothing without a server)."""
    if ctx.run is None:
        return
    gaps = metrics.get("gap_closed", {})
    rows = [
        {"stage": name, "miou": m.get("miou"), "pixel_acc": m.get("pixel_acc"), "gap_closed": gaps.get(name)}
        for name, m in metrics.get("stages", {}).items()
    ]
    ctx.run.publish_table(
        "table", rows, f"mIoU / pixel accuracy on target val per stage; final: {metrics.get('final_stage')}"
    )
    ctx.run.publish_markdown("report", report_md.read_text(), f"the run's report ({report_md})")


if __name__ == "__main__":
    ap = stage_parser(__doc__)
    ap.add_argument("--manifests", type=Path, required=True)
    ap.add_argument("--models", type=Path, required=True, help="folder of every stage's model folder")
    ap.add_argument("--pseudo", type=Path, required=True, help="folder of the pseudo-label stores")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True)
    ap.add_argument("--reports", type=Path, required=True)
    args = ap.parse_args()
    run_stage("evaluate", partial(main, args=args), args.params, [args.metrics], StageRun.for_stage)
