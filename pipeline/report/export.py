r"""A model's target-val predictions as Cityscapes label-ID PNGs, for the official evaluator.

    python -m pipeline.report.export --manifests data/manifests --model models/distill_1/last.pt \
        --out results [--official]
    CITYSCAPES_DATASET=data/cityscapes CITYSCAPES_RESULTS=results csEvalPixelLevelSemanticLabeling

``--official`` runs the official evaluation in-process on the pairs of the val manifest (any dataset root; the
instance-level scores only where every ``*_gtFine_instanceIds.png`` exists, which the embedded data lacks).

Each file is ``<city>/<city>_<seq>_<frame>_pred_labelIds.png`` at its ground truth's size, the name the official
script matches to ``gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png``. The predictions are the
evaluate stage's: the image as the stages read it (``data.target.resize``), the same autocast, logits upsampled
bilinearly to the label.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.config import ParamsError
from pipeline.data.datasets import DatasetError, SegDataset
from pipeline.data.labels import train_id_to_label_id
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.context import Data, read_model, setup
from pipeline.engine.loop import autocast
from pipeline.files import write_bytes
from pipeline.report.evaluation import predict_labels

SUFFIX = "_pred_labelIds.png"


@torch.no_grad()
def export_predictions(
    model: torch.nn.Module, val: SegDataset, out: Path, num_classes: int, device: torch.device
) -> list[Path]:
    """Writes one label-ID PNG per val image under ``out``, at its label's size."""
    to_label_id = train_id_to_label_id(num_classes)
    written = []
    for i in tqdm(range(len(val)), desc="export", unit="img", leave=False):
        sample = val.load(i)
        with autocast(device, True):  # as engine.evaluate scores the model
            pred = predict_labels(model, [sample["image"]], device, [sample["label"].shape])[0]
        path = out / f"{val.records[i].id}{SUFFIX}"  # ids are <city>/<city>_<seq>_<frame>
        write_bytes(path, _png(to_label_id[pred]))
        written.append(path)
    return written


def official_scores(preds: list[Path], val: SegDataset, out_json: Path) -> dict:
    """``cityscapesscripts``' pixel-level evaluation of ``preds`` (in val order) against the val labels; prints its
    table and writes its JSON. Instance-level scores only when every label has its instance file."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    gts = [str(r.label) for r in val.records]
    args = official.args  # the module's own settings object, as its command line uses it
    args.evalInstLevelScore = all(Path(g.replace("_labelIds.png", "_instanceIds.png")).is_file() for g in gts)
    args.JSONOutput, args.exportFile, args.quiet = True, str(out_json), False
    out_json.parent.mkdir(parents=True, exist_ok=True)
    return official.evaluateImgLists([str(p) for p in preds], gts, args)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a model file, e.g. models/distill_1/last.pt")
    ap.add_argument("--out", type=Path, required=True, help="folder for the PNGs (CITYSCAPES_RESULTS)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--manifests", type=Path, required=True, help="the prepare stage's manifests folder")
    ap.add_argument("--official", action="store_true", help="then score them with the official evaluation")
    args = ap.parse_args(argv)
    try:
        ctx, params = setup("export", args.params)
        model, _ = read_model(args.model, ctx)
        val = Data(params.data, args.manifests).dataset("target_val", with_labels=True)
        paths = export_predictions(model, val, args.out, ctx.num_classes, ctx.info.device)
    except (ParamsError, DatasetError, CheckpointError) as err:
        print(f"[export] error: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"[export] {len(paths)} label-ID predictions of {args.model} in {args.out}", flush=True)
    if args.official:
        result = official_scores(paths, val, args.out / "resultPixelLevelSemanticLabeling.json")
        print(f"[export] official mIoU {100.0 * result['averageScoreClasses']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
