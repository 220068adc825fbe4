"""The evaluate stage's report on a tiny run whose figures are known by hand.

Every "model" predicts one class everywhere (GroupNorm gain 0 / bias 1 before a one-hot classifier), so its
mIoU on the fixture's val labels is a simple pixel count, and the pseudo-label stores are built to have a known
coverage and accuracy.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ModelParams, Params, parse_params
from pipeline.data.datasets import LabelMapper, scan, validate_and_count, write_manifest
from pipeline.data.labels import class_names
from pipeline.distributed import DistInfo
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.context import Context, Data, new_model, save_model
from pipeline.engine.loop import evaluate
from pipeline.report import evaluation as report
from pipeline.report import render, summary
from pipeline.store.pseudo_store import PseudoLabelWriter
from stages.evaluate import final_stage, pseudo_stores, stage_models
from tests.tiny import tiny_params

REPO = Path(__file__).resolve().parents[1]
NAMES = class_names(19)
ROAD, BUILDING, SKY, PERSON, CAR = (NAMES.index(n) for n in ("road", "building", "sky", "person", "car"))
H, W = 32, 64
N_VAL = 2

# Val ground truth (Cityscapes label ids): sky rows 0-7 (one unlabelled pixel), building rows 8-15,
# road rows 16-31 with a 4x16 car block. Valid pixels per image: 511 + 512 + 960 + 64 = 2047; 4 classes.
VALID = 2047
GT_PIXELS = {SKY: 511, BUILDING: 512, ROAD: 960, CAR: 64}


def _val_label() -> np.ndarray:
    lab = np.full((H, W), 7, np.uint8)  # road
    lab[:8] = 23  # sky
    lab[8:16] = 11  # building
    lab[24:28, :16] = 26  # car
    lab[0, 0] = 0  # unlabeled -> ignore
    return lab


def _train_label() -> np.ndarray:
    lab = np.full((H, W), 7, np.uint8)
    lab[: H // 2] = 23  # top half sky, bottom half road
    return lab


def constant_miou(cls: int) -> float:
    """mIoU (%) of a model predicting `cls` everywhere: IoU = its gt share; the other gt classes score 0."""
    present = set(GT_PIXELS) | {cls}
    return round(100.0 * GT_PIXELS.get(cls, 0) / VALID / len(present), 4)


# Which class each stage's "model" predicts; oracle > adapt > warmup so the gap closed is defined.
PREDICTS = {"warmup": CAR, "adapt": SKY, "distill_1": BUILDING, "distill_2": BUILDING, "oracle": ROAD}
MP = ModelParams(
    backbone="resnet18",
    width=8,
    output_stride=8,
    feat_dim=16,
    head_dilations=(1, 2, 3, 4),
    dropout=0.1,
    gn_groups=8,
    se_reduction=4,
    bn_clr=False,
    pretrained=None,
)


RAW = tiny_params(
    **{
        "base.device": "cpu",
        "data.embedded": None,
        "data.source": {"kind": "gta5", "root": "src", "resize": None},
        "data.target": {"kind": "cityscapes", "root": "cs", "resize": None},
        "model": MP.model_dump(mode="json"),
        "warmup.target_bn": False,
        "adapt.target_bn": False,
        "distill.rounds": {
            "1": {"teacher": "models/adapt", "student_init": "previous"},
            "2": {"teacher": "models/distill_1", "student_init": "previous"},
        },
        "distill.conf_threshold": 0.95,
        "evaluate": {"batch_size": 2, "n_overlays": 2},
    }
)
MODELS, PSEUDO = Path("models"), Path("pseudo")
OUT = render.ReportOutputs(metrics=Path("metrics/evaluate.json"), plots=Path("plots/evaluate"), reports=Path("reports"))


def make_params(**evaluate) -> Params:
    return parse_params({**RAW, "evaluate": {**RAW["evaluate"], **evaluate}})


def make_ctx() -> Context:
    return Context("evaluate", 0, DistInfo(0, 1, 0, torch.device("cpu")), NAMES)


def build(ctx: Context, params: Params) -> report.Report:
    """The report as the evaluate stage builds it from a run's folders."""
    ev = params.evaluate
    models, stores = stage_models(params, MODELS), pseudo_stores(params, PSEUDO)
    data = Data(params.data, Path("data/manifests"))
    return report.build_report(ctx, data, models, stores, final_stage(params), ev.batch_size, ev.n_overlays)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_target(root: Path, n_train: int = 3, train_labels: bool = True) -> None:
    """Cityscapes-layout target under root/cs and its manifests (ids deliberately out of sorted order)."""
    rng = np.random.default_rng(0)
    for split, n, lab in (("train", n_train, _train_label()), ("val", N_VAL, _val_label())):
        for i in range(n):
            stem = f"city_{i:06d}_000019"
            _png(
                root / "cs/leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png",
                rng.integers(0, 255, (H, W, 3), np.uint8),
            )
            if split == "val" or train_labels:
                _png(root / "cs/gtFine" / split / "city" / f"{stem}_gtFine_labelIds.png", lab)
    mapper = LabelMapper("cityscapes", 19)
    for name, split in (("target_train", "train"), ("target_val", "val")):
        recs = scan("cityscapes", root / "cs", split, require_labels=name == "target_val")
        if name == "target_val":
            recs = recs[::-1]  # the overlays must pick by sorted id, not manifest order
        write_manifest(
            root / f"data/manifests/{name}.json", "cityscapes", split, recs, validate_and_count(recs, mapper)[0], NAMES
        )


@torch.no_grad()
def constant_model(cls: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = new_model(MP, len(NAMES))
    gn = m.head.bottleneck[1]
    gn.weight.zero_()
    gn.bias.fill_(1.0)  # features are all ones everywhere ...
    w = torch.zeros_like(m.head.classifier.weight)
    w[cls] = 1.0  # ... so only `cls` gets a positive logit
    m.head.classifier.weight.copy_(w)
    return m


def write_models(ctx: Context, predicts: dict[str, int]) -> None:
    for name, cls in predicts.items():
        m = constant_model(cls)
        save_model(Path(f"models/{name}/last.pt"), m, ctx, MP, {"kind": "last"})
        # adapt's best.pt differs from its last.pt (predicts road): it is evaluated too.
        best = constant_model(ROAD) if name == "adapt" else m
        save_model(Path(f"models/{name}/best.pt"), best, ctx, MP, {"kind": "best"})


def write_store(path: Path, ids: list[str], label: np.ndarray, conf: np.ndarray) -> None:
    """A store whose argmax/max are `label`/`conf` [h, w] for every image."""
    k = len(NAMES)
    prob = np.broadcast_to(((1 - conf) / (k - 1))[None], (k, *label.shape)).copy()
    np.put_along_axis(prob, label[None].astype(np.int64), conf[None], axis=0)
    with PseudoLabelWriter(path, ids, NAMES, *label.shape, "0" * 64, store_soft=True, background=False) as w:
        for i in range(len(ids)):
            w.write(i, torch.from_numpy(prob.astype(np.float32)))


# Stores at stride 8 (4x8) against train gt "top half sky, bottom half road".
GOOD = np.where(np.arange(4)[:, None] < 2, SKY, ROAD).repeat(8, 1).astype(np.uint8)
HALF_CONF = np.where(np.arange(8)[None] < 4, 0.99, 0.5).repeat(4, 0).astype(np.float32)


def write_stores(ids: list[str]) -> None:
    write_store(Path("pseudo/warmup.zarr"), ids, GOOD, np.full((4, 8), 0.6, np.float32))  # kept whole (thr 0)
    write_store(Path("pseudo/teacher_1.zarr"), ids, GOOD, HALF_CONF)  # right where kept; half is below 0.95
    write_store(
        Path("pseudo/teacher_2.zarr"),
        ids,
        np.where(GOOD == SKY, ROAD, SKY).astype(np.uint8),
        np.full((4, 8), 0.99, np.float32),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        ctx, params = make_ctx(), make_params()
        write_target(root)
        write_models(ctx, PREDICTS)
        write_stores([r["id"] for r in json.loads(Path("data/manifests/target_train.json").read_text())["files"]])
        rep = build(ctx, params)
        metrics = render.write_outputs(rep, OUT)
    return root, rep, metrics


def test_metrics_json(run):
    root, _, metrics = run
    assert json.loads((root / "metrics/evaluate.json").read_text()) == metrics
    assert list(metrics["stages"]) == ["warmup", "adapt", "distill_1", "distill_2", "oracle"]
    for name, cls in PREDICTS.items():
        assert metrics["stages"][name]["miou"] == pytest.approx(constant_miou(cls), abs=1e-4), name
        assert metrics["stages"][name]["pixel_acc"] == pytest.approx(100 * GT_PIXELS[cls] / VALID, abs=1e-4)
    assert metrics["final_stage"] == "distill_2"
    # Gap closed by hand from the JSON's own mIoU figures.
    s = metrics["stages"]
    w, o = s["warmup"]["miou"], s["oracle"]["miou"]
    assert set(metrics["gap_closed"]) == {"adapt", "distill_1", "distill_2"}
    for name, gap in metrics["gap_closed"].items():
        assert gap == pytest.approx(100 * (s[name]["miou"] - w) / (o - w), abs=1e-2)  # percent, as mIoU
    assert metrics["gap_closed"]["adapt"] == pytest.approx(100 * (511 - 64) / (960 - 64), abs=0.1)


def test_pseudo_label_quality(run):
    q = run[2]["pseudo_labels"]
    assert q["warmup"] == {"threshold": 0.0, "coverage": 100.0, "pixel_acc": 100.0, "miou": 100.0}
    assert q["teacher_1"] == {"threshold": 0.95, "coverage": 50.0, "pixel_acc": 100.0, "miou": 100.0}
    assert q["teacher_2"] == {"threshold": 0.95, "coverage": 100.0, "pixel_acc": 0.0, "miou": 0.0}


def test_best_checkpoint_only_in_markdown(run):
    root, rep, metrics = run
    assert rep.stages["adapt"].best_miou == pytest.approx(constant_miou(ROAD), abs=1e-4)
    assert not rep.stages["adapt"].best_is_last and rep.stages["warmup"].best_is_last
    assert "best" not in json.dumps(metrics)
    md = (root / "reports/report.md").read_text()
    assert "optimistic" in md and "source-only" in md
    assert "![confusion matrix](confusion.png)" in md and "![overlays](overlays.png)" in md
    assert (
        f"| {constant_miou(ROAD):.2f} |"
        in md.splitlines()[next(i for i, l in enumerate(md.splitlines()) if l.startswith("| adapt"))]
    )


def _rows(path: Path, reader=csv.DictReader) -> list:
    with path.open() as fh:
        return list(reader(fh))


def test_csvs(run):
    root = run[0]
    rows = _rows(root / "plots/evaluate/miou_by_stage.csv")
    assert [r["stage"] for r in rows] == list(PREDICTS) and list(rows[0]) == ["stage", "miou"]
    assert float(rows[-1]["miou"]) == pytest.approx(constant_miou(ROAD), abs=1e-4)
    # One (class, iou) file per model, for one bar chart each.
    assert sorted(p.name for p in (root / "plots/evaluate/per_class").iterdir()) == sorted(f"{n}.csv" for n in PREDICTS)
    per_class = {n: _rows(root / f"plots/evaluate/per_class/{n}.csv") for n in PREDICTS}
    assert all(list(rows[0]) == ["class", "iou"] and [r["class"] for r in rows] == NAMES for rows in per_class.values())
    assert float(per_class["oracle"][ROAD]["iou"]) == pytest.approx(100 * 960 / VALID, abs=1e-4)
    assert float(per_class["warmup"][ROAD]["iou"]) == 0.0
    assert per_class["oracle"][NAMES.index("train")]["iou"] == ""  # absent and never predicted: undefined
    # Pseudo-label quality per round, as in evaluate.json (round 0: the warm-up's soft labels).
    quality = _rows(root / "plots/evaluate/pseudo_labels.csv")
    assert [(r["round"], r["labels"]) for r in quality] == [("0", "warmup"), ("1", "teacher_1"), ("2", "teacher_2")]
    for r in quality:
        q = run[2]["pseudo_labels"][r["labels"]]
        assert [float(r[k]) for k in ("threshold", "coverage", "pixel_acc", "miou")] == [
            q[k] for k in ("threshold", "coverage", "pixel_acc", "miou")
        ]
    counts = _rows(root / "reports/confusion_counts.csv", csv.reader)
    assert counts[0][1:] == [*NAMES, "outside"] and len(counts) == 1 + len(NAMES)
    # The final model (distill_2) predicts building everywhere.
    assert sum(int(r[1 + BUILDING]) for r in counts[1:]) == N_VAL * VALID
    assert int(counts[1 + SKY][1 + BUILDING]) == N_VAL * 511


def test_pngs(run):
    root, rep, _ = run
    with Image.open(root / "reports/confusion.png") as im:
        w, h = im.size
    assert 0.8 < w / h < 1.5 and h >= 600
    lay = render.overlay_layout(N_VAL, 2 + len(PREDICTS), H, W, len(NAMES))
    with Image.open(root / "reports/overlays.png") as im:
        assert abs(im.size[0] - lay.width) <= 1 and abs(im.size[1] - lay.height) <= 1
        grid = np.asarray(im.convert("RGB"))
    assert lay.tile_w / lay.tile_h == pytest.approx(W / H)  # tiles keep the image's proportions
    assert lay.width == 7 * lay.tile_w + 8 * render.PAD
    # Overlays are the first images by sorted id, although the val manifest lists them in reverse.
    assert rep.overlay_ids == sorted(rep.overlay_ids)
    # The oracle tile (last column) is road-coloured over the image at the bottom of the first row.
    y, x = lay.tile_origin(0, lay.cols - 1)
    tile = grid[y : y + lay.tile_h, x : x + lay.tile_w].astype(int)
    road_rgb = np.array([128, 64, 128])
    bottom = tile[-lay.tile_h // 4 :].reshape(-1, 3).mean(0)
    assert np.abs(bottom - (render.ALPHA * road_rgb + (1 - render.ALPHA) * 127)).max() < 25


def test_missing_model_names_file_and_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx, params = make_ctx(), make_params()
    write_models(ctx, {"warmup": CAR})
    with pytest.raises(CheckpointError, match=r"stage 'adapt' not found: models/adapt/last\.pt"):
        build(ctx, params)
    m = stage_models(params, MODELS)[2]
    m.dir.mkdir(parents=True)
    m.last.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"stage 'distill@1'.*models/distill_1/last\.pt"):
        report.load_stage_model(m, m.last, ctx)


def test_quality_skipped_without_ground_truth(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ctx, params = make_ctx(), make_params()
    write_target(tmp_path, n_train=2, train_labels=False)
    write_store(Path("pseudo/warmup.zarr"), ["city/city_000000_000019", "city/city_000001_000019"], GOOD, HALF_CONF)
    stores = pseudo_stores(params, PSEUDO)[:1]
    quality, notes = report.pseudo_label_quality(ctx, Data(params.data, Path("data/manifests")), stores)
    assert quality == {} and "no ground truth" in notes[0]
    assert "pseudo/warmup.zarr skipped" in capsys.readouterr().out


def test_gap_closed_undefined_and_nan():
    gaps, notes = report.gap_closed({"warmup": 40.0, "oracle": 40.0, "adapt": 45.0}, ["adapt"])
    assert gaps == {"adapt": None} and "undefined" in notes[0]
    gaps, notes = report.gap_closed(
        {"warmup": 30.0, "oracle": 50.0, "adapt": 45.0, "distill_1": float("nan")}, ["adapt", "distill_1"]
    )
    assert gaps == {"adapt": 75.0, "distill_1": None} and notes == []


def test_final_stage_without_rounds():
    params = make_params()
    p = params.model_copy(update={"distill": params.distill.model_copy(update={"rounds": {}})})
    assert final_stage(p) == "adapt"
    assert [m.name for m in stage_models(p, MODELS)] == ["warmup", "adapt", "oracle"]


def test_summary_prints_table(run, capsys):
    assert summary.main([str(run[0] / "metrics/evaluate.json")]) == 0
    out = capsys.readouterr().out
    oracle = next(l for l in out.splitlines() if l.startswith("oracle"))
    assert f"{constant_miou(ROAD):.2f}" in oracle
    adapt = next(l for l in out.splitlines() if l.startswith("adapt"))
    assert f"{run[2]['gap_closed']['adapt']:.1f}%" in adapt
    assert "teacher_1" in out and "final model: distill_2" in out


def test_summary_missing_file(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.report.summary", "metrics/evaluate.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 1 and "dvc repro" in res.stderr


def test_gap_is_measured_from_the_source_only_row_when_present():
    # Source only 20, BN-aligned warm-up 30, stage 1 35, oracle 60: the warm-up closes (30-20)/40 = 25%,
    # stage 1 (35-20)/40 = 37.5%; without a source-only row the warm-up is the baseline.
    mious = {"source_only": 20.0, "warmup": 30.0, "adapt": 35.0, "oracle": 60.0}
    gaps, notes = report.gap_closed(mious, ["warmup", "adapt"])
    assert gaps == {"warmup": 25.0, "adapt": 37.5} and not notes
    gaps, _ = report.gap_closed({"warmup": 30.0, "adapt": 35.0, "oracle": 60.0}, ["adapt"])
    assert gaps == {"adapt": pytest.approx(100 / 6, abs=1e-2)}


def test_source_only_row_only_with_target_bn():
    names = [m.name for m in stage_models(make_params(), MODELS)]
    assert names == ["warmup", "adapt", "distill_1", "distill_2", "oracle"]
    raw = {**RAW, "warmup": {**RAW["warmup"], "target_bn": True}}
    params = parse_params(raw)
    models = stage_models(params, MODELS)
    assert [m.name for m in models][:2] == ["source_only", "warmup"]
    assert models[0].last == Path("models/warmup/source_only.pt") and models[0].best_file is None


def test_val_labels_keep_full_resolution_when_the_target_is_resized(tmp_path, monkeypatch):
    # Images are read at 40x80 (upscaled, as the paper presets do), val labels stay 32x64: the confusion matrix
    # counts every stored label pixel (the official protocol); the overlays draw image, labels and predictions
    # at that size.
    monkeypatch.chdir(tmp_path)
    ctx = make_ctx()
    params = parse_params(
        {**RAW, "data": {**RAW["data"], "target": {"kind": "cityscapes", "root": "cs", "resize": [40, 80]}}}
    )
    write_target(tmp_path)
    write_models(ctx, PREDICTS)
    data = Data(params.data, Path("data/manifests"))
    assert data.dataset("target_train", with_labels=True).load(0)["label"].shape == (40, 80)
    rep = report.build_report(ctx, data, stage_models(params, MODELS), [], final_stage(params), 2, 2)
    for name, cls in PREDICTS.items():
        assert rep.stages[name].cm.counts.sum() == N_VAL * VALID
        assert rep.stages[name].summary["miou"] == pytest.approx(constant_miou(cls), abs=1e-3)
        assert all(p.shape == (H, W) for p in rep.stages[name].overlay_preds)
    assert [i.shape for i in rep.overlay_images] == [(H, W, 3)] * 2
    assert [lab.shape for lab in rep.overlay_labels] == [(H, W)] * 2


def test_val_images_of_different_sizes_are_evaluated(tmp_path, monkeypatch):
    # A fleet's val set with two image sizes: batches hold one size each, every pixel is counted.
    monkeypatch.chdir(tmp_path)
    write_target(tmp_path)
    small = np.full((12, 20), 23, np.uint8)  # sky
    _png(tmp_path / "cs/leftImg8bit/val/city/city_000009_000019_leftImg8bit.png", np.zeros((12, 20, 3), np.uint8))
    _png(tmp_path / "cs/gtFine/val/city/city_000009_000019_gtFine_labelIds.png", small)
    recs = scan("cityscapes", tmp_path / "cs", "val")
    write_manifest(
        Path("data/manifests/target_val.json"),
        "cityscapes",
        "val",
        recs,
        validate_and_count(recs, LabelMapper("cityscapes", 19))[0],
        NAMES,
    )
    val = Data(make_params().data, Path("data/manifests")).dataset("target_val", with_labels=True)
    cm = evaluate(constant_model(SKY), val, len(NAMES), DistInfo(0, 1, 0, torch.device("cpu")), batch_size=3)
    assert cm.counts.sum() == N_VAL * VALID + 12 * 20
    assert cm.counts[SKY, SKY] == N_VAL * GT_PIXELS[SKY] + 12 * 20


def test_no_oracle_row_and_no_gap_when_the_oracle_is_off(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = make_ctx()
    params = parse_params({**RAW, "oracle": {**RAW["oracle"], "enabled": False}})
    models = stage_models(params, MODELS)
    assert "oracle" not in [m.name for m in models]
    write_target(tmp_path)
    write_models(ctx, {n: c for n, c in PREDICTS.items() if n != "oracle"})
    rep = report.build_report(ctx, Data(params.data, Path("data/manifests")), models, [], final_stage(params), 2, 0)
    assert rep.gap_closed == {} and rep.metrics()["gap_closed"] == {}
    assert "no oracle (oracle.enabled)" in rep.notes[0]
    md = render.markdown(rep)
    assert "gap closed (%)" not in md and "No oracle row (`oracle.enabled: false`)" in md


def test_exported_predictions_score_the_same_with_the_official_evaluator(tmp_path, monkeypatch):
    # The model reads 40x80 images; its label-ID PNGs are written at the labels' 32x64, found by the official
    # script's own file matching, and scored by it as the evaluate stage scores the model.
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    from pipeline.report.export import export_predictions, official_scores

    monkeypatch.chdir(tmp_path)
    target = {"kind": "cityscapes", "root": "cs", "resize": [40, 80]}
    params = parse_params({**RAW, "data": {**RAW["data"], "target": target}})
    write_target(tmp_path)
    torch.manual_seed(1)
    model = new_model(MP, len(NAMES)).eval()  # untrained: varied predictions on the noise images
    val = Data(params.data, Path("data/manifests")).dataset("target_val", with_labels=True)
    paths = export_predictions(model, val, Path("results"), len(NAMES), torch.device("cpu"))
    assert sorted(p.as_posix() for p in paths) == [
        f"results/city/city_{i:06d}_000019_pred_labelIds.png" for i in range(N_VAL)
    ]
    assert all(np.asarray(Image.open(p)).shape == (H, W) for p in paths)
    args = official.args  # module-global: every attribute touched here is restored after the test
    for name in ("predictionPath", "predictionWalk", "evalInstLevelScore", "JSONOutput", "exportFile", "quiet"):
        monkeypatch.setattr(args, name, getattr(args, name, None))
    args.predictionPath, args.predictionWalk = str(tmp_path / "results"), None
    gts = [str(r.label) for r in val.records]
    assert [official.getPrediction(args, g) for g in gts] == [str(tmp_path / p) for p in paths]  # its matching
    result = official_scores(paths, val, Path("results/official.json"))
    assert args.evalInstLevelScore is False  # the fixture has no instance files
    assert json.loads(Path("results/official.json").read_text())["averageScoreClasses"] == result["averageScoreClasses"]
    cm = evaluate(model, val, len(NAMES), DistInfo(0, 1, 0, torch.device("cpu")), batch_size=1)
    assert len({int(v) for p in paths for v in np.unique(np.asarray(Image.open(p)))}) > 1
    assert cm.miou() == pytest.approx(result["averageScoreClasses"], abs=1e-9)
