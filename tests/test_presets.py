"""Each paper preset (``params/*.yaml``) through a tiny `dvc repro` of the whole DAG, on real-layout fixtures.

The preset is used as written except for sizes (images, crops, ``model.width``), iterations, batch sizes, the
device and (only where a preset names an absolute path) the dataset roots and weight files; see
``tiny_preset``. The inputs are written by the test in the layouts the loaders read (tests/fixtures_real.py):
GTA5 or SYNTHIA (16-bit labels) source pairs, Cityscapes train/val frames, a random torchvision-format ResNet
for ``model.pretrained`` and a SimCLRv2-style checkpoint for ``distill.student_weights``. So weight loading,
the adversarial warm-up, the KD rounds with a SimCLR student and the 13-class mIoU run through the real code:
a renamed key or a broken loader fails here.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests import fixtures_real as fx
from tests.tiny import DVC, REPO, run, workspace

pytestmark = pytest.mark.slow  # `dvc repro` of the whole DAG per preset

PRESETS = sorted((REPO / "params").glob("*.yaml"))

# What the tiny runs read and train at: (height, width) of the images as read, crops the same size.
SIZE = (32, 64)
SOURCE_STORED = (36, 66)  # stored sizes differ from SIZE where a preset resizes on read (the resize path runs)
BASE_WIDTH = 68  # a preset's view.base_width (the public --resize 2200 for 2048-wide frames): a bit above SIZE
# ResNet-101 at width 16 (stage widths 16..128, ×4 out): width 64 took 2 min 15 s and 5.7 GB per preset here
# (a 260 MB file per model, a dozen of them, each cached by DVC). The weight fixtures are written at this width.
WIDTH = 16
ITERS = 2
BATCH = 2
N_SOURCE, N_TARGET_TRAIN, N_TARGET_VAL = 4, 4, 2


# ------------------------------------------------------------------------------------------------ params
def _training_sections(p: dict) -> list[dict]:
    return [sec for sec in p.values() if isinstance(sec, dict) and "optim" in sec]


def _local(path: str | None, default: str) -> str | None:
    """A preset's path as written when it is relative (it then lives in the workspace), else ``default``."""
    if path is None or not Path(path).is_absolute():
        return path
    return default


def tiny_preset(preset: dict) -> dict:
    """The preset with tiny sizes, iterations and batches on the CPU; every other knob as written."""
    p = copy.deepcopy(preset)
    p["base"].update(device="cpu", threads=1)
    data = p["data"]
    data["num_workers"] = 0
    for dom in ("source", "target"):
        d = data[dom]
        d["root"] = _local(d["root"], f"data/{dom}_{d['kind']}")
        if d["resize"] is not None:
            d["resize"] = list(SIZE)
    p["model"]["width"] = WIDTH
    p["model"]["pretrained"] = _local(p["model"]["pretrained"], "weights/pretrained.pth")
    p["distill"]["student_weights"] = _local(p["distill"]["student_weights"], "weights/student.pth")
    for sec in _training_sections(p):
        o = sec["optim"]
        o.update(iters=ITERS, batch_size=BATCH, ckpt_every=ITERS, log_every=1)
        o["eval_every"] = 0 if o["eval_every"] == 0 else ITERS
        if o.get("schedule_iters") is not None:  # a horizon beyond the run, as the presets' 90k for 62k
            o["schedule_iters"] = ITERS + 1
        view = sec["view"]
        view["crop"] = list(SIZE)
        if view.get("base_width") is not None:
            view["base_width"] = BASE_WIDTH
    for name in ("pseudo_label", "prototypes", "teacher", "evaluate"):
        p[name]["batch_size"] = BATCH
    return p


# ---------------------------------------------------------------------------------------------- fixtures
def write_inputs(root: Path, p: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Datasets at the (tiny) preset's roots and its weight files; returns the weights written, by param."""
    src, tgt = p["data"]["source"], p["data"]["target"]
    stored = SOURCE_STORED if src["resize"] is not None else SIZE
    if src["kind"] == "gta5":
        fx.write_gta5(root / src["root"], N_SOURCE, stored)
    else:
        fx.write_synthia(root / src["root"], N_SOURCE, stored)
    # Cityscapes frames at one size, as read (target train frames must share one; the pseudo-label stores hold it).
    fx.write_cityscapes(root / tgt["root"], "train", N_TARGET_TRAIN, SIZE)
    fx.write_cityscapes(root / tgt["root"], "val", N_TARGET_VAL, SIZE)
    arch, width = p["model"]["backbone"], p["model"]["width"]
    weights = {}
    if p["model"]["pretrained"]:
        weights["pretrained"] = fx.write_imagenet_resnet(root / p["model"]["pretrained"], arch, 0, width)
    if p["distill"]["student_weights"]:
        weights["student"] = fx.write_simclr_resnet(root / p["distill"]["student_weights"], arch, 1, width)
    return weights


# --------------------------------------------------------------------------------------------- checks
def expected_stages(p: dict) -> list[str]:
    rounds = sorted(p["distill"]["rounds"], key=int)
    base = ["generate", "prepare", "warmup", "oracle", "pseudo_label", "prototypes", "adapt", "evaluate"]
    return sorted(base + [f"{s}@{r}" for r in rounds for s in ("teacher", "distill")])


def backbone_similarity(model_file: Path, ref: dict[str, torch.Tensor]) -> float:
    """Lowest cosine similarity, over the backbone's conv weights, between a model file and a reference
    torchvision state dict: about 1 for weights loaded from it and trained a few steps, about 0 otherwise."""
    state = torch.load(model_file, map_location="cpu", weights_only=True)["model"]
    sims = []
    for k, v in ref.items():
        if k.startswith("fc.") or v.ndim != 4:
            continue
        w = state[f"backbone.{k}"].float().flatten()
        sims.append(float(torch.nn.functional.cosine_similarity(w, v.float().flatten(), dim=0)))
    assert sims, f"no backbone conv weights compared in {model_file}"
    return min(sims)


def _csv_header(path: Path) -> list[str]:
    with path.open() as fh:
        return next(csv.reader(fh))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_tiny_repro(preset: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(preset.read_text())
    p = tiny_preset(raw)
    root = workspace(tmp_path / "repo", p, git_dvc=True)
    weights = write_inputs(root, p)

    res = run([*DVC, "repro"], root)
    ran = re.findall(r"Running stage '([^']+)'", res.stdout)
    assert sorted(ran) == expected_stages(p), res.stdout[-3000:]

    # The report covers every model of the run; a 16-class (SYNTHIA) run adds the 13-class mIoU.
    report: dict[str, Any] = json.loads((root / "metrics/evaluate.json").read_text())
    rounds = sorted(p["distill"]["rounds"], key=int)
    stages = {"warmup", "adapt", *(f"distill_{r}" for r in rounds)}
    stages |= {"oracle"} if p["oracle"]["enabled"] else set()
    stages |= {"source_only"} if p["warmup"]["target_bn"] else set()
    assert set(report["stages"]) == stages, report
    assert report["final_stage"] == (f"distill_{rounds[-1]}" if rounds else "adapt")
    for name, m in report["stages"].items():
        keys = ("miou", "pixel_acc", "miou_13") if p["data"]["num_classes"] == 16 else ("miou", "pixel_acc")
        assert all(m.get(k) is not None for k in keys), (name, m)

    # The warm-up ran adversarially: its curves and final losses have the LS-GAN terms.
    if p["warmup"]["adversarial"]["enabled"]:
        header = _csv_header(root / "plots/warmup/train.csv")
        assert {"adv_g", "adv_d"} <= set(header), header
        final = json.loads((root / "metrics/warmup.json").read_text())["final_losses"]
        assert {"adv_g", "adv_d"} <= set(final), final

    # model.pretrained was loaded into the warm-up's backbone, distill.student_weights into each "pretrained"
    # round's student (the SimCLR file: another random ResNet, so the two are told apart).
    if "pretrained" in weights:
        assert backbone_similarity(root / "models/warmup/last.pt", weights["pretrained"]) > 0.95
    for r, spec in p["distill"]["rounds"].items():
        assert (root / f"models/distill_{r}/last.pt").is_file()
        if spec.get("student_init") == "pretrained":
            student = root / f"models/distill_{r}/last.pt"
            assert backbone_similarity(student, weights["student"]) > 0.95, r
            assert backbone_similarity(student, weights["pretrained"]) < 0.5, r
            meta = torch.load(student, map_location="cpu", weights_only=True)["meta"]
            assert meta["model"]["bn_clr"] == p["distill"]["student_bn_clr"], meta["model"]

    # BatchNorm is each stage's policy: a frozen warm-up keeps the pretrained running statistics (the source-only
    # model, before any target re-estimation), a stage that trains BatchNorm moves them.
    def bn_mean(stage_file: str) -> torch.Tensor:
        return torch.load(root / stage_file, map_location="cpu", weights_only=True)["model"][
            "backbone.bn1.running_mean"
        ]

    if "pretrained" in weights and p["warmup"]["freeze_bn"]:
        kept = "models/warmup/source_only.pt" if p["warmup"]["target_bn"] else "models/warmup/last.pt"
        assert torch.equal(bn_mean(kept), weights["pretrained"]["bn1.running_mean"])
    if not p["adapt"]["freeze_bn"] and not p["adapt"]["precise_bn"]["enabled"]:
        assert not torch.equal(bn_mean("models/adapt/last.pt"), bn_mean("models/warmup/last.pt"))

    # Passed: free the workspace's ~1 GB of model files and DVC cache (a failure keeps it for a look).
    shutil.rmtree(root)
