"""Command-line arguments shared by the training stages (dvc.yaml passes every path)."""

import argparse
from pathlib import Path

from pipeline.engine.training import TrainOutputs


def training_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Inputs and outputs every training stage has: manifests in; model folder, metrics, plots out."""
    ap.add_argument("--manifests", type=Path, required=True, help="folder of the prepare stage's manifests")
    ap.add_argument("--out", type=Path, required=True, help="model folder (last.pt, best.pt)")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--plots", type=Path, required=True, help="folder of the training curves and per-class CSV")
    return ap


def training_outputs(args: argparse.Namespace) -> TrainOutputs:
    return TrainOutputs(models=args.out, metrics=args.metrics, plots=args.plots)
