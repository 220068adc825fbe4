"""Loaders for GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes, their validation, and manifests.

Labels are converted to contiguous train IDs (ignore = 255) right here, at the dataset boundary.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.data import labels as L
from pipeline.files import write_text

Kind = Literal["gta5", "synthia", "cityscapes"]


class DatasetError(ValueError):
    """Bad dataset input; the message names the file or folder."""


@dataclass(frozen=True)
class Record:
    id: str
    image: str
    label: str | None


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")


def scan_gta5(root: str | Path) -> list[Record]:
    """GTA5 layout: ``images/NNNNN.png`` with ``labels/NNNNN.png`` holding Cityscapes label IDs."""
    root = Path(root)
    _require_dir(root / "images", "GTA5 image folder")
    _require_dir(root / "labels", "GTA5 label folder")
    recs = []
    for img in sorted((root / "images").glob("*.png")):
        lab = root / "labels" / img.name
        if not lab.is_file():
            raise DatasetError(f"image without label: {img} (expected {lab})")
        recs.append(Record(img.stem, str(img), str(lab)))
    if not recs:
        raise DatasetError(f"no images in {root / 'images'}")
    return recs


def scan_synthia(root: str | Path) -> list[Record]:
    """SYNTHIA-RAND-CITYSCAPES layout: ``RGB/*.png`` with ``GT/LABELS/*.png`` (16-bit, class in channel 0)."""
    root = Path(root)
    _require_dir(root / "RGB", "SYNTHIA image folder")
    _require_dir(root / "GT" / "LABELS", "SYNTHIA label folder")
    recs = []
    for img in sorted((root / "RGB").glob("*.png")):
        lab = root / "GT" / "LABELS" / img.name
        if not lab.is_file():
            raise DatasetError(f"image without label: {img} (expected {lab})")
        recs.append(Record(img.stem, str(img), str(lab)))
    if not recs:
        raise DatasetError(f"no images in {root / 'RGB'}")
    return recs


def scan_cityscapes(root: str | Path, split: str, require_labels: bool = True) -> list[Record]:
    """Cityscapes layout: ``leftImg8bit/<split>/<city>/<n>_leftImg8bit.png`` and the gtFine labelIds."""
    root = Path(root)
    img_dir = root / "leftImg8bit" / split
    _require_dir(img_dir, f"Cityscapes {split} image folder")
    recs = []
    for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = img.name.removesuffix("_leftImg8bit.png")
        lab = root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png"
        if not lab.is_file():
            if require_labels:
                raise DatasetError(f"image without label: {img} (expected {lab})")
            lab = None
        recs.append(Record(f"{img.parent.name}/{stem}", str(img), None if lab is None else str(lab)))
    if not recs:
        raise DatasetError(f"no images in {img_dir}")
    return recs


def scan(kind: Kind, root: str | Path, split: str = "train", require_labels: bool = True) -> list[Record]:
    if kind == "gta5":
        return scan_gta5(root)
    if kind == "synthia":
        return scan_synthia(root)
    if kind == "cityscapes":
        return scan_cityscapes(root, split, require_labels)
    raise DatasetError(f"unknown dataset kind '{kind}'")


# --------------------------------------------------------------------------------------------- reading
def read_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3]; an unreadable or truncated file raises DatasetError naming it."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None


def read_synthia_ids(path: str | Path) -> np.ndarray:
    """Class IDs [H, W] int64 of a SYNTHIA label: channel 0 of a 16-bit PNG (the instance ID in another).

    Decoded with torchvision: Pillow opens 16-bit multi-channel PNGs as 8-bit RGB and keeps only the high byte,
    which turns every class ID below 256 into 0 (void).
    """
    from torchvision.io import ImageReadMode, decode_png

    try:
        raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        arr = decode_png(raw, ImageReadMode.UNCHANGED)  # [C, H, W], uint16 for 16-bit files
    except (OSError, RuntimeError, ValueError) as err:
        raise DatasetError(f"cannot read label {path}: {err}") from None
    return arr[0].numpy().astype(np.int64)


class LabelMapper:
    """Reads a label file of a dataset kind and maps its IDs to contiguous train IDs."""

    def __init__(self, kind: Kind, num_classes: int) -> None:
        self.kind = kind
        self.num_classes = num_classes
        if kind == "synthia":
            self.lut = L.synthia_lut(num_classes)
            self.valid_ids = L.SYNTHIA_VALID_IDS
        else:
            self.lut = L.cityscapes_lut(num_classes)
            self.valid_ids = L.cityscapes_valid_ids()
        self._valid = np.zeros(len(self.lut), dtype=bool)
        self._valid[sorted(self.valid_ids)] = True

    def read_ids(self, path: str | Path) -> np.ndarray:
        if self.kind == "synthia":
            return read_synthia_ids(path)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise DatasetError(f"cannot read label {path}: {err}") from None
        if arr.ndim != 2:
            raise DatasetError(f"label {path} must be a single-channel ID image, has shape {arr.shape}")
        return arr

    def check_ids(self, ids: np.ndarray, path: str | Path) -> None:
        uniq = np.unique(ids)
        bad = [int(u) for u in uniq if u < 0 or u >= len(self._valid) or not self._valid[u]]
        if bad:
            raise DatasetError(f"label {path} holds IDs outside the {self.kind} ID set: {bad[:10]}")

    def read(self, path: str | Path, size: tuple[int, int] | None = None, check: bool = True) -> np.ndarray:
        """Train-ID map [H, W] uint8 (255 = ignore), optionally resized with nearest neighbour."""
        ids = self.read_ids(path)
        if check:
            self.check_ids(ids, path)
        out = self.lut[np.clip(ids, 0, len(self.lut) - 1)]
        if size is not None and out.shape != tuple(size):
            out = np.asarray(Image.fromarray(out).resize((size[1], size[0]), Image.NEAREST))
        return out


# --------------------------------------------------------------------------------------------- dataset
class SegDataset(torch.utils.data.Dataset):
    """Images (uint8 CHW tensors) with train-ID labels; `transform(sample, key)` adds views per sample.

    Items are addressed by an integer index, or by ``(index, seed)`` so that each sample's augmentation is
    seeded by the sampler rather than by worker state (exact resume and reproducible views).
    """

    def __init__(
        self,
        records: Sequence[Record],
        mapper: LabelMapper | None,
        size: tuple[int, int] | None = None,
        transform: Callable[[dict, torch.Generator], dict] | None = None,
        check_labels: bool = False,
        resize_labels: bool = True,
    ) -> None:
        self.records = list(records)
        self.mapper = mapper
        self.size = size
        self.transform = transform
        self.check_labels = check_labels
        # False: labels stay at their stored size while images are resized (evaluation at full resolution).
        self.resize_labels = resize_labels

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def load(self, index: int) -> dict:
        rec = self.records[index]
        img = torch.from_numpy(read_image(rec.image, self.size)).permute(2, 0, 1).contiguous()
        sample = {"id": rec.id, "index": index, "image": img}
        if self.mapper is not None and rec.label is not None:
            lab = self.mapper.read(rec.label, self.size if self.resize_labels else None, check=self.check_labels)
            sample["label"] = torch.from_numpy(lab.astype(np.int64))
        return sample

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = (key, index_seed(0, key)) if isinstance(key, int) else key
        sample = self.load(index)
        if self.transform is not None:
            gen = torch.Generator().manual_seed(int(seed))
            sample = self.transform(sample, gen)
        return sample


def index_seed(seed: int, index: int, epoch: int = 0) -> int:
    """A per-(seed, epoch, index) augmentation seed, stable across processes and resumes."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1)[0])


# -------------------------------------------------------------------------------------------- manifest
def validate_and_count(
    records: Sequence[Record], mapper: LabelMapper, resized: bool = False
) -> tuple[np.ndarray, Counter[tuple[int, int]], list[str]]:
    """Reads every image and label (catching truncated files and foreign IDs).

    Returns per-class pixel counts, the image sizes (h, w) found, and the labels whose size differs from
    their image's. A differing size is an error unless the split is ``resized`` on read (both then come out
    at the same size; GTA5 has a few such pairs), in which case it is returned for the summary.
    """
    counts = np.zeros(mapper.num_classes + 1, dtype=np.int64)  # last bin: ignore
    sizes: Counter[tuple[int, int]] = Counter()
    mismatched: list[str] = []
    for rec in records:
        h, w = read_image(rec.image).shape[:2]
        sizes[(h, w)] += 1
        if rec.label is None:
            continue
        lab = mapper.read(rec.label, check=True)
        if lab.shape != (h, w):
            if not resized:
                raise DatasetError(
                    f"label {rec.label} is {lab.shape[1]}x{lab.shape[0]}, its image {rec.image} is {w}x{h}"
                )
            mismatched.append(rec.id)
        c = np.bincount(np.minimum(lab.reshape(-1), mapper.num_classes), minlength=mapper.num_classes + 1)
        counts += c
    return counts, sizes, mismatched


def write_manifest(
    path: str | Path, kind: str, split: str, records: Sequence[Record], counts: np.ndarray, names: list[str]
) -> dict:
    manifest = {
        "kind": kind,
        "split": split,
        "num_images": len(records),
        "class_names": names,
        "class_pixels": {n: int(c) for n, c in zip(names, counts[:-1])},
        "ignore_pixels": int(counts[-1]),
        "files": [{"id": r.id, "image": r.image, "label": r.label} for r in records],
    }
    write_text(path, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path} (run the prepare stage)")
    data = json.loads(path.read_text())
    return [Record(f["id"], f["image"], f["label"]) for f in data["files"]]


def manifest_file(folder: str | Path, split: str) -> Path:
    """The manifest of a split (``source``, ``target_train``, ``target_val``) in the manifests folder."""
    return Path(folder) / f"{split}.json"


def prepare_manifests(data, out_dir: str | Path, names: list[str]) -> dict:
    """Validates the source and target roots and writes one manifest per split; returns a summary."""
    out_dir = Path(out_dir)
    splits = {
        "source": (data.source, "train"),
        "target_train": (data.target, "train"),
        "target_val": (data.target, "val"),
    }
    summary = {}
    for name, (domain, split) in splits.items():
        # Target-train labels are optional (unlabelled real data); they only feed quality metrics and oracle.
        recs = scan(domain.kind, domain.root, split, require_labels=name != "target_train")
        resized = domain.resize is not None
        counts, sizes, mismatched = validate_and_count(recs, LabelMapper(domain.kind, data.num_classes), resized)
        if name == "target_train" and len(sizes) > 1 and not resized:
            # The pseudo-label stores hold one image size; evaluation alone would cope with mixed sizes.
            found = ", ".join(f"{w}x{h}: {n}" for (h, w), n in sizes.most_common(5))
            raise DatasetError(
                f"target train images under {domain.root} differ in size ({found}); set data.target.resize "
                "to [height, width] to read them at one size"
            )
        write_manifest(manifest_file(out_dir, name), domain.kind, split, recs, counts, names)
        summary[name] = {"images": len(recs), "labelled": sum(r.label is not None for r in recs)}
        if mismatched:
            # Target-val labels keep their stored size (evaluation at full resolution), the others are resized.
            how = "images read at" if name == "target_val" else "both read at"
            print(
                f"[prepare] {name}: {len(mismatched)} label(s) differ in size from their image ({how} "
                f"{domain.resize}), e.g. {mismatched[:3]}",
                flush=True,
            )
            summary[name]["label_size_differs"] = len(mismatched)
    return summary
