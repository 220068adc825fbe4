"""Small fixtures in the real dataset and weight layouts, written by the tests (nothing is downloaded).

- GTA5: ``images/NNNNN.png`` (RGB) + ``labels/NNNNN.png``: 8-bit palette PNGs of Cityscapes label IDs, as GTA5
  ships them.
- SYNTHIA-RAND-CITYSCAPES: ``RGB/NNNNNNN.png`` + ``GT/LABELS/NNNNNNN.png``: 16-bit RGB PNGs, the SYNTHIA class
  ID in channel 0 and an instance ID (above 255, so an 8-bit read would garble it) in channel 1.
- Cityscapes: ``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (8-bit grey label IDs).
- Weights: a random ResNet state dict with torchvision's keys (fc.* included, as torchvision writes it; at a
  ``model.width`` other than 64 every channel count scaled), and a SimCLRv2-style checkpoint of another one:
  the backbone wrapped under "state_dict" with the "module.encoder." prefixes of a converted SimCLR checkpoint.

Scenes are coarse street layouts (sky, buildings, vegetation, road, sidewalk, a few objects) whose pixels are
the class colour plus noise, so the label maps hold several classes, including IDs that map to ignore.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.labels import CS_LABELS, SYNTHIA_IDS_16, class_names

# Cityscapes label IDs by name (what GTA5 and Cityscapes label PNGs hold).
CS_ID = {lab.name: lab.id for lab in CS_LABELS if lab.id >= 0}
CS_COLOR = {lab.id: lab.color for lab in CS_LABELS if lab.id >= 0}
# SYNTHIA class IDs by Cityscapes class name (the documented 16-class map).
SYNTHIA_ID = dict(zip(class_names(16), SYNTHIA_IDS_16, strict=True))
# Ground-truth classes of a scene, by Cityscapes name; "unlabeled"/"ego vehicle" map to ignore.
_OBJECTS = ("car", "person", "pole", "traffic sign", "bicycle", "rider", "fence", "wall", "traffic light", "bus")


def _png(path: Path, im: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3]); Pillow cannot write 16-bit RGB, so the chunks are written here."""
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    rows = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def scene(rng: np.random.Generator, h: int, w: int, objects: tuple[str, ...] = _OBJECTS) -> np.ndarray:
    """A street-like map of Cityscapes class names' IDs [H, W] uint8 (sky, buildings, vegetation, road, ...)."""
    ids = np.full((h, w), CS_ID["road"], np.uint8)
    horizon = int(h * rng.uniform(0.35, 0.55))
    ids[:horizon] = CS_ID["sky"]
    sky_line = int(horizon * rng.uniform(0.2, 0.5))
    split = int(w * rng.uniform(0.3, 0.7))
    ids[sky_line:horizon, :split] = CS_ID["building"]
    ids[sky_line:horizon, split:] = CS_ID["vegetation"]
    walk = int(w * rng.uniform(0.1, 0.25))
    ids[horizon:, :walk] = CS_ID["sidewalk"]
    ids[horizon:, w - walk :] = CS_ID["terrain"]
    for name in rng.choice(objects, size=3, replace=False):
        oh, ow = int(rng.integers(3, max(4, h // 3))), int(rng.integers(3, max(4, w // 5)))
        y, x = int(rng.integers(horizon // 2, h - oh)), int(rng.integers(0, w - ow))
        ids[y : y + oh, x : x + ow] = CS_ID[name]
    ids[-2:, :] = CS_ID["ego vehicle"]  # ignore in every protocol
    ids[0, :3] = CS_ID["unlabeled"]
    return ids


def render(rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3]: each class's Cityscapes colour plus noise."""
    lut = np.zeros((256, 3), np.float32)
    for i, c in CS_COLOR.items():
        lut[i] = c
    img = lut[ids] + rng.normal(0.0, 20.0, (*ids.shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _palette() -> list[int]:
    pal = np.zeros((256, 3), np.uint8)
    for i, c in CS_COLOR.items():
        pal[i] = c
    return pal.reshape(-1).tolist()


def write_gta5(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """GTA5 layout: ``images/00001.png`` ... with palette-PNG ``labels/`` of Cityscapes label IDs."""
    rng = np.random.default_rng(seed)
    for i in range(1, n + 1):
        ids = scene(rng, *size)
        _png(root / "images" / f"{i:05d}.png", Image.fromarray(render(rng, ids)))
        lab = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
        lab.putpalette(_palette())
        _png(root / "labels" / f"{i:05d}.png", lab)
    return root


def write_synthia(root: Path, n: int, size: tuple[int, int], seed: int = 1) -> Path:
    """SYNTHIA-RAND-CITYSCAPES layout: ``RGB/0000000.png`` ... with 16-bit ``GT/LABELS/`` (class ID in channel 0)."""
    rng = np.random.default_rng(seed)
    # SYNTHIA has no terrain/truck/train: its scenes use the 16 classes it labels (0 = void).
    to_synthia = np.zeros(256, np.uint16)
    for name, sid in SYNTHIA_ID.items():
        to_synthia[CS_ID[name]] = sid
    for i in range(n):
        ids = scene(rng, *size)
        ids[ids == CS_ID["terrain"]] = CS_ID["sidewalk"]
        _png(root / "RGB" / f"{i:07d}.png", Image.fromarray(render(rng, ids)))
        lab = np.zeros((*size, 3), np.uint16)
        lab[..., 0] = to_synthia[ids]
        lab[..., 1] = 300 + i  # instance IDs above 255
        png16(root / "GT" / "LABELS" / f"{i:07d}.png", lab)
    return root


def write_cityscapes(root: Path, split: str, n: int, size: tuple[int, int], seed: int = 2) -> Path:
    """Cityscapes layout: ``leftImg8bit/<split>/<city>/<city>_<seq>_000019_leftImg8bit.png`` + gtFine labelIds."""
    rng = np.random.default_rng(seed)
    cities = {"train": ("aachen", "bochum"), "val": ("frankfurt", "lindau")}[split]
    for i in range(n):
        city = cities[i % len(cities)]
        stem = f"{city}_{i:06d}_000019"
        ids = scene(rng, *size)
        _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", Image.fromarray(render(rng, ids)))
        _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", Image.fromarray(ids))
    return root


def random_resnet(arch: str, seed: int, width: int = 64) -> dict[str, torch.Tensor]:
    """A random ResNet state dict with torchvision's keys (fc.* included), as torchvision writes it.

    The keys and layout come from torchvision's own ``arch`` (not from the pipeline's backbone builder, so a
    renamed key there fails the load). ``width`` other than torchvision's 64 scales every channel count by
    width/64 (the first conv's 3 input channels and fc's 1000 outputs aside): the stage widths
    width·(1, 2, 4, 8) (×4 for Bottleneck) of ``model.width``. Conv weights are drawn as torchvision initialises
    them (Kaiming normal, fan out); BatchNorm statistics and affine parameters are drawn too, so two such files
    differ everywhere and a wrong or skipped load shows.
    """
    import torchvision

    with torch.device("meta"):  # torchvision's keys and shapes only; the values are drawn below
        net = getattr(torchvision.models, arch)(weights=None)
    bns = {name for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    last_bn = "bn3" if isinstance(net.layer1[0], torchvision.models.resnet.Bottleneck) else "bn2"
    g = torch.Generator().manual_seed(seed)

    def scaled(c: int) -> int:
        if c * width % 64:
            raise ValueError(f"width {width}: channel count {c} does not scale to an integer")
        return c * width // 64

    sd: dict[str, torch.Tensor] = {}
    for key, ref in net.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if key.startswith("fc."):
            shape = (ref.shape[0], scaled(ref.shape[1])) if ref.ndim == 2 else tuple(ref.shape)
            sd[key] = torch.randn(shape, generator=g) * 0.01
        elif ref.ndim == 4:  # conv: [out, in, kh, kw]
            out, inp, kh, kw = ref.shape
            shape = (scaled(out), inp if inp == 3 else scaled(inp), kh, kw)
            sd[key] = torch.randn(shape, generator=g) * (2.0 / (shape[0] * kh * kw)) ** 0.5
        elif module in bns and leaf == "num_batches_tracked":
            sd[key] = torch.tensor(1000, dtype=ref.dtype)
        elif module in bns:
            c = scaled(ref.shape[0])
            if leaf == "weight":
                # Small gains at the end of each residual branch (as zero_init_residual, but not zero): activations
                # stay bounded through the blocks of a ResNet-101 whose BatchNorm is frozen.
                gain = 0.2 if module.startswith("layer") and module.endswith(last_bn) else 1.0
                sd[key] = gain * (0.5 + torch.rand(c, generator=g))
            elif leaf == "running_var":
                sd[key] = 0.5 + torch.rand(c, generator=g)
            else:  # bias, running_mean
                sd[key] = 0.1 * torch.randn(c, generator=g)
        else:
            raise AssertionError(f"unexpected torchvision key {key}")
    return sd


def write_imagenet_resnet(
    path: Path, arch: str = "resnet101", seed: int = 0, width: int = 64
) -> dict[str, torch.Tensor]:
    """``model.pretrained``: a torchvision-format ResNet state dict. Returns it."""
    sd = random_resnet(arch, seed, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


def write_simclr_resnet(path: Path, arch: str = "resnet101", seed: int = 1, width: int = 64) -> dict[str, torch.Tensor]:
    """``distill.student_weights``: a SimCLRv2-style checkpoint (``{"state_dict": {"module.encoder.<key>": ...}}``)
    of another random ResNet. Returns the plain (torchvision-named) state dict."""
    sd = random_resnet(arch, seed, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.encoder.{k}": v for k, v in sd.items()}, "epoch": 100}, path)
    return sd
