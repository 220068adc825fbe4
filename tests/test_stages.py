"""Stage contracts and bad-input errors, running the real stage modules on tiny generated data."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pipeline.maths.prototypes import PrototypeBank
from pipeline.store.pseudo_store import PseudoLabelStore, PseudoLabelWriter
from tests.tiny import run, stage, tiny_params, workspace, write_params

pytestmark = pytest.mark.slow  # every test runs the real stages (subprocesses)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """generate -> prepare -> warmup -> pseudo_label -> prototypes, once for the module."""
    root = workspace(tmp_path_factory.mktemp("stages") / "ws")
    for name in ("generate", "prepare", "warmup", "pseudo_label", "prototypes"):
        stage(name, root)
    return root


@pytest.fixture
def ws(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ws"
    shutil.copytree(base, dst, symlinks=True)
    return dst


def test_generated_data_is_in_the_real_layouts(base: Path) -> None:
    assert len(list((base / "data/embedded/source/images").glob("*.png"))) == 6
    assert list((base / "data/embedded/target/gtFine/val").glob("*/*_gtFine_labelIds.png"))
    manifest = json.loads((base / "data/manifests/source.json").read_text())
    assert manifest["kind"] == "gta5" and manifest["num_images"] == 6 and sum(manifest["class_pixels"].values()) > 0


def test_warmup_outputs_and_curves(base: Path) -> None:
    last = torch.load(base / "models/warmup/last.pt", weights_only=True)
    meta = last["meta"]
    assert meta["kind"] == "last" and len(meta["class_names"]) == 19
    metrics = json.loads((base / "metrics/warmup.json").read_text())
    assert 0 <= metrics["miou"] <= 100 and metrics["iters"] == 4
    # warmup.target_bn (tiny params): the model as trained is kept as source_only.pt; last.pt has the same
    # weights with BatchNorm statistics of target train, and is also best.pt (no selection on val).
    source = torch.load(base / "models/warmup/source_only.pt", weights_only=True)
    assert "optimistic" not in meta["note"] and "AdaBN" in meta["note"]
    assert 0 <= metrics["source_only"]["miou"] <= 100 and metrics["target_bn_images"] == 6
    stats = [k for k in last["model"] if k.endswith("running_mean")]
    assert stats and any(not torch.equal(last["model"][k], source["model"][k]) for k in stats)
    weights = [k for k in last["model"] if k.endswith(".weight")]
    assert all(torch.equal(last["model"][k], source["model"][k]) for k in weights)
    best = torch.load(base / "models/warmup/best.pt", weights_only=True)["model"]
    assert all(torch.equal(best[k], last["model"][k]) for k in best)
    rows = list(csv.DictReader((base / "plots/warmup/train.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and float(rows[0]["ce"]) > 0


def test_pseudo_labels_and_prototypes_contract(base: Path) -> None:
    store = PseudoLabelStore(base / "pseudo/warmup.zarr")
    manifest = json.loads((base / "data/manifests/target_train.json").read_text())
    assert store.ids == [f["id"] for f in manifest["files"]] and store.has_soft
    assert (store.height, store.width) == (4, 8)  # 32x64 images at output stride 8
    quality = json.loads((base / "metrics/pseudo_label.json").read_text())
    assert quality["coverage"] == 100.0 and "miou" in quality and quality["throughput"]["images"] == 6
    bank = PrototypeBank.from_file(base / "models/prototypes.pt", num_classes=19)
    assert bank.protos.shape == (19, 16)
    # Classes never predicted stay marked empty, not silent zero vectors that look like prototypes.
    empty = ~bank.initialized
    assert empty.any() and torch.all(bank.protos[empty] == 0)


def test_adversarial_warmup_runs(ws: Path) -> None:
    write_params(ws, tiny_params(**{"warmup.adversarial.enabled": True, "warmup.optim.iters": 2}))
    stage("warmup", ws)
    header = (ws / "plots/warmup/train.csv").read_text().splitlines()[0]
    assert "adv_g" in header and "adv_d" in header


def test_missing_checkpoint_names_the_file(ws: Path) -> None:
    shutil.rmtree(ws / "models/warmup")
    res = stage("pseudo_label", ws, check=False)
    assert res.returncode == 1
    assert "checkpoint not found: models/warmup/last.pt" in res.stderr


def test_store_from_another_dataset_names_the_store(ws: Path) -> None:
    # A store made for another dataset: same shape and classes, other image ids.
    ids = [f"elsewhere/elsewhere_{i:06d}_000019" for i in range(6)]
    names = PseudoLabelStore(ws / "pseudo/warmup.zarr").class_names
    shutil.rmtree(ws / "pseudo/warmup.zarr")
    with PseudoLabelWriter(ws / "pseudo/warmup.zarr", ids, names, 4, 8, "0" * 64) as w:
        w.write_batch(0, torch.softmax(torch.randn(6, 19, 4, 8), 1))
    res = stage("prototypes", ws, check=False)
    assert res.returncode == 1
    assert "pseudo/warmup.zarr" in res.stderr and "lacks" in res.stderr


def test_prototypes_with_wrong_class_count_names_the_file(ws: Path) -> None:
    bank = PrototypeBank(16, 16)
    bank.save(ws / "models/prototypes.pt", [f"c{i}" for i in range(16)])
    res = stage("adapt", ws, check=False)
    assert res.returncode == 1
    assert "models/prototypes.pt" in res.stderr and "16 classes" in res.stderr


def test_bad_params_name_the_key(ws: Path) -> None:
    write_params(ws, tiny_params(**{"adapt.tau": -1}))
    res = stage("adapt", ws, check=False)
    assert res.returncode == 1 and "adapt.tau" in res.stderr


def _clean_target_batches(root: Path, n: int) -> list[torch.Tensor]:
    """The first ``n`` target train images as the stages read them (no augmentation), one batch."""
    import os

    from pipeline.config import load_params
    from pipeline.engine.context import Data

    cwd = os.getcwd()
    os.chdir(root)  # manifests hold paths relative to the workspace
    try:
        params = load_params(root / "params.yaml")
        tgt = Data(params.data, Path("data/manifests")).dataset("target_train", with_labels=False)
        return [torch.stack([tgt.load(i)["image"] for i in range(n)]).float() / 255.0]
    finally:
        os.chdir(cwd)


def test_precise_bn_re_estimates_statistics_on_clean_target_images(ws: Path) -> None:
    from pipeline.data.labels import class_names
    from pipeline.distributed import DistInfo
    from pipeline.engine.context import Context, read_model
    from pipeline.models import batchnorms, estimate_bn_stats

    write_params(ws, tiny_params(**{"adapt.precise_bn": {"enabled": True, "max_images": 4}}))
    res = stage("adapt", ws)
    assert "precise BN: BatchNorm statistics re-estimated on 4 target train images" in res.stdout + res.stderr
    ctx = Context("t", 0, DistInfo(0, 1, 0, torch.device("cpu")), class_names(19))
    model, _ = read_model(ws / "models/adapt/last.pt", ctx)
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    # Same weights, statistics re-estimated here from the first 4 clean images: the saved ones must match.
    estimate_bn_stats(model, iter(_clean_target_batches(ws, 4)))
    assert batchnorms(model) and saved
    for k, v in model.state_dict().items():
        if "running_" in k:
            torch.testing.assert_close(v, saved[k], rtol=1e-4, atol=1e-5, msg=k)
    # Without it the statistics are the training forwards' (weak + strong views), not those.
    write_params(ws, tiny_params(**{"adapt.precise_bn": {"enabled": False, "max_images": 4}}))
    stage("adapt", ws)
    model, _ = read_model(ws / "models/adapt/last.pt", ctx)
    off = {k: v for k, v in model.state_dict().items() if "running_mean" in k}
    assert any(not torch.allclose(v, saved[k], atol=1e-4) for k, v in off.items())


def test_partly_labelled_target_train_oracle_and_rectified_quality(ws: Path) -> None:
    # One target-train image without its label (a fleet's partly annotated set): the oracle says which key
    # to set, stage 1 measures its pseudo labels on the labelled images, and the oracle can be switched off.
    labels = sorted((ws / "data/embedded/target/gtFine/train").glob("*/*_gtFine_labelIds.png"))
    labels[0].unlink()
    stage("prepare", ws)
    res = stage("oracle", ws, check=False)
    assert res.returncode == 1
    assert "1 of 6 images have none" in res.stderr and "set oracle.enabled: false" in res.stderr
    stage("adapt", ws)
    rectified = json.loads((ws / "metrics/adapt_rectified.json").read_text())
    assert 0 <= rectified["rectified"]["miou"] <= 100
    write_params(ws, tiny_params(**{"oracle.enabled": False}))
    stage("oracle", ws)
    note = json.loads((ws / "metrics/oracle.json").read_text())
    assert "oracle.enabled is false" in note["skipped"]
    assert sorted(p.name for p in (ws / "models/oracle").iterdir()) == ["skipped.json"]


def test_export_writes_official_evaluator_files(ws: Path) -> None:
    argv = [sys.executable, "-m", "pipeline.report.export", "--manifests", "data/manifests"]
    argv += ["--model", "models/warmup/last.pt", "--out", "res"]
    res = run([*argv, "--official"], ws)
    files = sorted((ws / "res").glob("*/*_pred_labelIds.png"))
    val = sorted((ws / "data/embedded/target/gtFine/val").glob("*/*_gtFine_labelIds.png"))
    assert [f.name.removesuffix("_pred_labelIds.png") for f in files] == [
        v.name.removesuffix("_gtFine_labelIds.png") for v in val
    ]
    assert "2 label-ID predictions" in res.stdout
    official = json.loads((ws / "res/resultPixelLevelSemanticLabeling.json").read_text())["averageScoreClasses"]
    assert f"official mIoU {100 * official:.2f}" in res.stdout
    bad = run([*argv[:5], "--model", "nope.pt", "--out", "r"], ws, check=False)
    assert bad.returncode == 1 and "nope.pt" in bad.stderr and "Traceback" not in bad.stderr
