"""The embedded synthetic dataset: layout, label ids, class coverage, determinism and the domain gap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as CS_LABELS
from PIL import Image

from pipeline.data import synth
from pipeline.data.synth import SynthConfig, SynthStyle, generate, render

CS_IDS = {lab.id for lab in CS_LABELS if lab.id >= 0}
TRAIN19 = {lab.id for lab in CS_LABELS if 0 <= lab.trainId < 255}
ROAD_ID = next(lab.id for lab in CS_LABELS if lab.name == "road")


def tiny(**kw) -> SynthConfig:
    base = dict(seed=3, height=32, width=64, n_source=3, n_target_train=4, n_target_val=2)
    base.update(kw)
    return SynthConfig(**base)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_filenames_and_label_ids(tmp_path: Path) -> None:
    cfg = tiny()
    root = tmp_path / "embedded"
    summary = generate(root, cfg)

    assert sorted(p.name for p in (root / "source" / "images").iterdir()) == [
        "00001.png",
        "00002.png",
        "00003.png",
    ]
    assert sorted(p.name for p in (root / "source" / "labels").iterdir()) == [
        "00001.png",
        "00002.png",
        "00003.png",
    ]
    expect = {
        "train": [synth.target_stem(cfg.train_cities, i) for i in range(4)],
        "val": [synth.target_stem(cfg.val_cities, i) for i in range(2)],
    }
    assert expect["train"][0] == (cfg.train_cities[0], f"{cfg.train_cities[0]}_000000_000019")
    assert expect["train"][3] == (cfg.train_cities[0], f"{cfg.train_cities[0]}_000001_000019")
    for split, stems in expect.items():
        imgs = sorted((root / "target" / "leftImg8bit" / split).glob("*/*.png"))
        labs = sorted((root / "target" / "gtFine" / split).glob("*/*.png"))
        assert [p.relative_to(root / "target" / "leftImg8bit" / split).as_posix() for p in imgs] == sorted(
            f"{c}/{s}_leftImg8bit.png" for c, s in stems
        )
        assert [p.relative_to(root / "target" / "gtFine" / split).as_posix() for p in labs] == sorted(
            f"{c}/{s}_gtFine_labelIds.png" for c, s in stems
        )
    # Cities are disjoint between splits, as in Cityscapes.
    train_c = {p.name for p in (root / "target" / "leftImg8bit" / "train").iterdir()}
    val_c = {p.name for p in (root / "target" / "leftImg8bit" / "val").iterdir()}
    assert train_c == set(cfg.train_cities) and val_c == set(cfg.val_cities) and not train_c & val_c

    for img_p in [*root.glob("source/images/*.png"), *root.glob("target/leftImg8bit/*/*/*.png")]:
        with Image.open(img_p) as im:
            assert im.mode == "RGB" and im.size == (64, 32)
    for lab_p in [*root.glob("source/labels/*.png"), *root.glob("target/gtFine/*/*/*.png")]:
        with Image.open(lab_p) as im:
            assert im.mode == "L" and im.size == (64, 32)
            assert set(np.unique(np.asarray(im)).tolist()) <= CS_IDS

    assert summary["counts"] == {"source": 3, "target_train": 4, "target_val": 2}
    assert sum(summary["pixels"]["source"].values()) == 3 * 32 * 64
    assert set(summary["pixels"]["target_val"]) == {*synth.TRAIN_CLASSES, "ignore"}
    assert (root / synth.SUMMARY_NAME).is_file()
    assert not (tmp_path / "embedded.tmp").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["embedded"]


@pytest.mark.parametrize(("domain", "split"), [("source", "train"), ("target", "train"), ("target", "val")])
def test_all_19_classes_appear_within_20_images(domain: str, split: str) -> None:
    cfg = tiny(height=64, width=128)
    seen: set[int] = set()
    for i in range(20):
        _, lab = render(cfg, domain, split, i)
        seen |= set(np.unique(lab).tolist())
    assert TRAIN19 <= seen, f"missing ids {sorted(TRAIN19 - seen)}"
    assert seen <= synth.WRITTEN_IDS <= CS_IDS


def test_same_seed_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = (
        generate(tmp_path / "a", tiny()),
        generate(tmp_path / "b", tiny()),
        generate(tmp_path / "c", tiny(seed=4)),
    )
    assert a == b
    fa, fb, fc = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert fa == fb
    assert fa.keys() == fc.keys()
    pngs = [k for k in fa if k.endswith(".png")]
    assert all(fa[k] != fc[k] for k in pngs if "labels" in k or "gtFine" in k)
    assert c["pixels"] != a["pixels"]


def test_growing_a_split_keeps_its_first_images(tmp_path: Path) -> None:
    small = files(generate_root(tmp_path / "small", tiny(n_source=2, n_target_train=3, n_target_val=1)))
    big = files(generate_root(tmp_path / "big", tiny(n_source=5, n_target_train=7, n_target_val=3)))
    pngs = [k for k in small if k.endswith(".png")]
    assert len(pngs) == 2 * (2 + 3 + 1)
    for k in pngs:
        assert small[k] == big[k], k


def generate_root(root: Path, cfg: SynthConfig) -> Path:
    generate(root, cfg)
    return root


def test_regenerating_replaces_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "d"
    generate(root, tiny(n_source=4))
    generate(root, tiny(n_source=2))
    assert len(list((root / "source" / "images").iterdir())) == 2
    assert not (tmp_path / "d.tmp").exists()


def test_crash_leaves_no_complete_looking_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synth.render

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kw)

    monkeypatch.setattr(synth, "render", flaky)
    with pytest.raises(RuntimeError):
        generate(tmp_path / "new", tiny())
    assert not (tmp_path / "new").exists()  # only the .tmp build folder, never the final name

    old = tmp_path / "old"
    monkeypatch.setattr(synth, "render", real)
    generate(old, tiny())
    before = files(old)
    calls["n"] = 0
    monkeypatch.setattr(synth, "render", flaky)
    with pytest.raises(RuntimeError):
        generate(old, tiny(seed=9))
    assert files(old) == before  # the previous complete tree is untouched
    monkeypatch.setattr(synth, "render", real)
    generate(old, tiny())
    assert not (tmp_path / "old.tmp").exists()


def _road_stats(cfg: SynthConfig, domain: str, n: int = 6) -> tuple[np.ndarray, float]:
    """Mean road colour and high-frequency energy (mean |Laplacian|) inside road regions."""
    cols, hf = [], []
    for i in range(n):
        img, lab = render(cfg, domain, "train", i)
        f = img.astype(np.float64).mean(axis=2)
        lap = np.abs(4 * f[1:-1, 1:-1] - f[:-2, 1:-1] - f[2:, 1:-1] - f[1:-1, :-2] - f[1:-1, 2:])
        # Road interior only, away from edges and lane markings' borders.
        road = lab == ROAD_ID
        inner = road[1:-1, 1:-1] & road[:-2, 1:-1] & road[2:, 1:-1] & road[1:-1, :-2] & road[1:-1, 2:]
        cols.append(img[road].mean(axis=0))
        hf.append(lap[inner].mean())
    return np.mean(cols, axis=0), float(np.mean(hf))


def test_domains_differ_in_colour_and_texture() -> None:
    cfg = tiny(height=64, width=128)
    src_col, src_hf = _road_stats(cfg, "source")
    tgt_col, tgt_hf = _road_stats(cfg, "target")
    assert np.abs(src_col - tgt_col).max() > 10
    assert tgt_hf > src_hf + 5  # sensor noise and texture vs flat shading


def test_knobs_close_the_gap() -> None:
    """A target styled like the source renders like the source (the gap comes from the knobs)."""
    cfg = tiny(height=64, width=128)
    flat = SynthConfig(**{**cfg.__dict__, "target_style": SynthStyle.from_dict(cfg.source_style.to_dict())})
    s_col, s_hf = _road_stats(flat, "source")
    t_col, t_hf = _road_stats(flat, "target")
    assert abs(s_hf - t_hf) < 3
    assert np.abs(s_col - t_col).max() < 12


def test_config_dict_round_trip_and_validation() -> None:
    cfg = tiny()
    d = cfg.to_dict()
    assert SynthConfig.from_dict(d) == cfg
    assert isinstance(d["target_style"]["colour_cast"], list)
    part = SynthConfig.from_dict({"seed": 1, "target_style": {"noise_std": 0.0}})
    assert part.target_style.noise_std == 0.0
    assert part.target_style.palette_shift == synth.target_style().palette_shift  # completed from defaults
    with pytest.raises(ValueError, match="unknown"):
        SynthConfig.from_dict({"sead": 1})
    with pytest.raises(ValueError, match="unknown"):
        SynthStyle.from_dict({"noise": 1.0})
    with pytest.raises(ValueError, match="class_frequency"):
        SynthStyle(class_frequency={"unicorn": 2.0})
    with pytest.raises(ValueError, match="disjoint"):
        SynthConfig(train_cities=("a",), val_cities=("a",))
