"""Loaders of the real layouts on small fixture trees, and their bad-input errors."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import DatasetError, LabelMapper, SegDataset, prepare_manifests, scan
from pipeline.data.labels import SYNTHIA_IDS_16, class_names


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _png16(path, arr):
    """A 16-bit PNG (grey or RGB), as SYNTHIA ships its labels; Pillow cannot write 16-bit RGB."""
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    rows = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def make_gta5(root, n=2, label_value=7):
    for i in range(n):
        _png(root / "images" / f"{i:05d}.png", np.full((8, 12, 3), 40 * i, np.uint8))
        lab = np.full((8, 12), label_value, np.uint8)
        lab[0, 0] = 0  # unlabeled -> ignore
        lab[1, :] = 26  # car
        _png(root / "labels" / f"{i:05d}.png", lab)


def make_cityscapes(root, split="train", city="aachen", n=2):
    for i in range(n):
        stem = f"{city}_{i:06d}_000019"
        _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", np.zeros((8, 12, 3), np.uint8))
        lab = np.full((8, 12), 23, np.uint8)  # sky
        lab[4:, :] = 22  # terrain
        _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)


def make_synthia(root, n=2):
    for i in range(n):
        _png(root / "RGB" / f"{i:07d}.png", np.zeros((8, 12, 3), np.uint8))
        lab = np.zeros((8, 12, 3), np.uint16)
        lab[..., 0] = 3  # road
        lab[4:, :, 0] = 21  # wall (SYNTHIA id 21 -> wall)
        lab[..., 1] = 300 + i  # instance id in another channel, above 255
        _png16(root / "GT" / "LABELS" / f"{i:07d}.png", lab)


def test_gta5_ids_map_to_train_ids(tmp_path):
    make_gta5(tmp_path)
    recs = scan("gta5", tmp_path)
    assert [r.id for r in recs] == ["00000", "00001"]
    ds = SegDataset(recs, LabelMapper("gta5", 19))
    s = ds[0]
    assert s["image"].shape == (3, 8, 12)
    lab = s["label"].numpy()
    assert lab[0, 0] == 255 and lab[2, 2] == class_names(19).index("road") and lab[1, 3] == 13  # car


def test_cityscapes_ids_and_subsets(tmp_path):
    make_cityscapes(tmp_path)
    recs = scan("cityscapes", tmp_path, "train")
    assert recs[0].id == "aachen/aachen_000000_000019"
    lab19 = SegDataset(recs, LabelMapper("cityscapes", 19))[0]["label"].numpy()
    assert set(np.unique(lab19)) == {10, 9}  # sky, terrain
    lab16 = SegDataset(recs, LabelMapper("cityscapes", 16))[0]["label"].numpy()
    assert set(np.unique(lab16)) == {class_names(16).index("sky"), 255}  # terrain is not a 16-class class


def test_synthia_id_map(tmp_path):
    make_synthia(tmp_path)
    m = LabelMapper("synthia", 16)
    lab = SegDataset(scan("synthia", tmp_path), m)[0]["label"].numpy()
    assert lab[0, 0] == 0 and lab[5, 0] == class_names(16).index("wall")
    assert SYNTHIA_IDS_16[3] == 21
    lab13 = SegDataset(scan("synthia", tmp_path), LabelMapper("synthia", 13))[0]["label"].numpy()
    assert lab13[5, 0] == 255  # wall is dropped in the 13-class protocol


def test_synthia_labels_keep_16_bits(tmp_path):
    # Channel 0 of a 16-bit RGB label reads as written (Pillow kept only the high byte: 3 read as 0); an ID
    # above 255 is not folded into a valid one.
    lab = np.zeros((4, 6, 3), np.uint16)
    lab[..., 0] = 3  # road
    lab[0, 0, 0] = 256 + 3
    lab[..., 1] = 7  # instance
    _png16(tmp_path / "rgb16.png", lab)
    m = LabelMapper("synthia", 16)
    assert m.read_ids(tmp_path / "rgb16.png")[0].tolist() == [259, 3, 3, 3, 3, 3]
    with pytest.raises(DatasetError, match=r"rgb16.png holds IDs outside the synthia ID set: \[259\]"):
        m.read(tmp_path / "rgb16.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "rgb16.png").read_bytes()[:30])
    with pytest.raises(DatasetError, match="cannot read label .*cut.png"):
        m.read(tmp_path / "cut.png")


def test_resize_on_read(tmp_path):
    make_gta5(tmp_path, n=1)
    s = SegDataset(scan("gta5", tmp_path), LabelMapper("gta5", 19), size=(4, 6))[0]
    assert s["image"].shape == (3, 4, 6) and s["label"].shape == (4, 6)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="GTA5 image folder not found: .*nowhere"):
        scan("gta5", tmp_path / "nowhere")


def test_image_without_label_names_file(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "labels" / "00001.png").unlink()
    with pytest.raises(DatasetError, match=r"image without label: .*00001\.png"):
        scan("gta5", tmp_path)


def test_truncated_image_names_file(tmp_path):
    make_gta5(tmp_path)
    img = tmp_path / "images" / "00001.png"
    img.write_bytes(img.read_bytes()[:40])
    ds = SegDataset(scan("gta5", tmp_path), LabelMapper("gta5", 19))
    with pytest.raises(DatasetError, match=r"cannot read image .*00001\.png"):
        ds[1]


def test_label_outside_id_set_names_file(tmp_path):
    make_gta5(tmp_path, label_value=200)
    m = LabelMapper("gta5", 19)
    with pytest.raises(DatasetError, match=r"label .*00000\.png holds IDs outside the gta5 ID set: \[200\]"):
        m.read(scan("gta5", tmp_path)[0].label)


def test_prepare_writes_manifests_with_counts(tmp_path):
    from types import SimpleNamespace

    make_gta5(tmp_path / "gta")
    make_cityscapes(tmp_path / "cs", "train", "aachen")
    make_cityscapes(tmp_path / "cs", "val", "lindau", n=1)
    data = SimpleNamespace(
        source=SimpleNamespace(kind="gta5", root=str(tmp_path / "gta"), resize=None),
        target=SimpleNamespace(kind="cityscapes", root=str(tmp_path / "cs"), resize=None),
        num_classes=19,
    )
    summary = prepare_manifests(data, tmp_path / "m", class_names(19))
    assert summary["target_val"]["images"] == 1
    man = json.loads((tmp_path / "m" / "source.json").read_text())
    assert man["class_pixels"]["car"] == 2 * 12 and man["ignore_pixels"] == 2
    assert man["class_pixels"]["road"] == 2 * (8 * 12 - 12 - 1)
    assert len(man["files"]) == 2


def test_prepare_rejects_corrupt_label(tmp_path):
    from types import SimpleNamespace

    make_gta5(tmp_path / "gta")
    make_cityscapes(tmp_path / "cs", "train")
    make_cityscapes(tmp_path / "cs", "val", "lindau", n=1)
    bad = tmp_path / "cs" / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((8, 12), 99, np.uint8)).save(bad)
    data = SimpleNamespace(
        source=SimpleNamespace(kind="gta5", root=str(tmp_path / "gta"), resize=None),
        target=SimpleNamespace(kind="cityscapes", root=str(tmp_path / "cs"), resize=None),
        num_classes=19,
    )
    with pytest.raises(DatasetError, match="lindau_000000_000019_gtFine_labelIds.png holds IDs outside"):
        prepare_manifests(data, tmp_path / "m", class_names(19))


def _data(tmp_path, source_resize=None, target_resize=None):
    from types import SimpleNamespace

    return SimpleNamespace(
        source=SimpleNamespace(kind="gta5", root=str(tmp_path / "gta"), resize=source_resize),
        target=SimpleNamespace(kind="cityscapes", root=str(tmp_path / "cs"), resize=target_resize),
        num_classes=19,
    )


def test_label_of_another_size_is_an_error_unless_the_split_is_resized(tmp_path, capsys):
    # GTA5 has a few images whose label differs in size; read at one size, the pair is usable.
    make_gta5(tmp_path / "gta")
    make_cityscapes(tmp_path / "cs", "train")
    make_cityscapes(tmp_path / "cs", "val", "lindau", n=1)
    _png(tmp_path / "gta" / "labels" / "00001.png", np.full((10, 12), 7, np.uint8))
    with pytest.raises(DatasetError, match=r"labels/00001.png is 12x10, its image .*images/00001.png is 12x8"):
        prepare_manifests(_data(tmp_path), tmp_path / "m", class_names(19))
    summary = prepare_manifests(_data(tmp_path, source_resize=(8, 12)), tmp_path / "m", class_names(19))
    assert summary["source"] == {"images": 2, "labelled": 2, "label_size_differs": 1}
    assert "1 label(s) differ in size" in capsys.readouterr().out
    ds = SegDataset(scan("gta5", tmp_path / "gta"), LabelMapper("gta5", 19), size=(8, 12))
    assert ds[1]["label"].shape == ds[1]["image"].shape[1:] == (8, 12)


def test_target_train_of_mixed_sizes_needs_a_resize(tmp_path):
    make_gta5(tmp_path / "gta")
    make_cityscapes(tmp_path / "cs", "train")
    make_cityscapes(tmp_path / "cs", "val", "lindau", n=1)
    stem = "aachen_000001_000019"
    _png(
        tmp_path / "cs" / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png", np.zeros((6, 10, 3), np.uint8)
    )
    _png(tmp_path / "cs" / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png", np.full((6, 10), 7, np.uint8))
    with pytest.raises(
        DatasetError, match=r"target train images .* differ in size \(12x8: 1, 10x6: 1\); set data.target.resize"
    ):
        prepare_manifests(_data(tmp_path), tmp_path / "m", class_names(19))
    summary = prepare_manifests(_data(tmp_path, target_resize=(8, 12)), tmp_path / "m", class_names(19))
    assert summary["target_train"] == {"images": 2, "labelled": 2}
