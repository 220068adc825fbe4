"""Weak and strong views of an image that share one exactly known geometry with its labels and dense maps.

Geometry model
--------------
Every view carries ``coords``: for each view pixel, the position in the ORIGINAL image it shows, in
``grid_sample`` convention (normalised x, y in [-1, 1], ``align_corners=False``: pixel column ``c`` of a
width-``W`` image is centred at ``x = (2c + 1) / W - 1``). All view geometry (rescale, crop/pad, flip,
rotate, shear, translate) is affine, so the coords are computed analytically from a 2x3 matrix
(``View.affine``) rather than pushed through the transforms as a nearest-interpolated map: they are exact to
float32, defined everywhere (also on padding, where ``valid`` is False), and can be resampled to any
resolution by bilinear interpolation without error (bilinear interpolation of an affine field is exact).

Any map given in the original image's geometry (labels, soft pseudo labels ``[K, h, w]`` or features
``[D, h, w]`` at the network's stride, computed on the FULL un-augmented image) is brought into a view by
``warp_to_view(map, view.coords, out_size)``. Maps are assumed to cover their image edge to edge
(``align_corners=False``), the same convention as ``F.interpolate(..., align_corners=False)``.

Pixels come from ``torchvision.transforms.v2.functional``: antialiased resize for the weak view's rescale
and the v2 colour kernels for the photometric RandAugment ops. Geometric strong ops are composed into one
matrix and applied as a single ``grid_sample`` resampling (one interpolation instead of one per op), so
``warp_to_view(weak.image, strong.coords_in_weak)`` *is* the strong image before cutout. The inverse matrices
follow ``torchvision.transforms.v2.functional.affine`` (checked in tests/test_views.py).

All randomness is drawn from the ``torch.Generator`` passed in (a CPU generator); no global RNG is touched,
so a per-sample seeded generator gives the same views in any DataLoader worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

IGNORE_INDEX = 255
# Fill for padding, out-of-bounds and cutout pixels of the image. Those pixels are invalid (excluded from
# every loss); the public code uses grey 127, the project spec uses 0.
IMAGE_FILL = 0.0

PHOTOMETRIC_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Brightness",
    "Color",
    "Contrast",
    "Equalize",
    "Identity",
    "Posterize",
    "Sharpness",
    "Solarize",
)
GEOMETRIC_OPS: tuple[str, ...] = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
# The FixMatch/ProDA RandAugment pool (the public ProDA code's strong augmentation).
RANDAUG_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Brightness",
    "Color",
    "Contrast",
    "Equalize",
    "Identity",
    "Posterize",
    "Rotate",
    "Sharpness",
    "ShearX",
    "ShearY",
    "Solarize",
    "TranslateX",
    "TranslateY",
)


@dataclass
class WeakViewConfig:
    """Random rescale (factor relative to the given image, or to that image at ``base_width`` with its aspect
    kept: the public code's ``--resize``), random crop (padded if smaller), hflip."""

    crop_size: tuple[int, int]  # (h, w)
    scale_range: tuple[float, float] = (0.5, 1.5)
    hflip_p: float = 0.5
    base_width: int | None = None

    def __post_init__(self) -> None:
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (h, w) with positive sides, got {self.crop_size}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        if self.base_width is not None and self.base_width < 1:
            raise ValueError(f"base_width must be positive or None, got {self.base_width}")


@dataclass
class StrongViewConfig:
    """RandAugment (FixMatch/ProDA pool) + cutout, applied on top of a weak view.

    ``num_ops`` ops are drawn uniformly with replacement from ``ops``; each gets a magnitude m drawn uniformly
    from ``magnitude_range`` (inclusive) and is applied with probability ``op_p``. Magnitudes map linearly,
    m/10 of the op's maximum, as in the public code: Rotate 3m deg, ShearX/Y 0.03m, TranslateX/Y 0.03m of the
    side (whole pixels), all with a random sign; Brightness/Color/Contrast/Sharpness enhance factor
    0.05 + 0.09m; Posterize 4 + int(0.4m) bits; Solarize threshold (256 - int(25.6m)) / 255.
    ``hflip_p``: the public RandAugmentMC also flips the strong view with p=0.5 before the ops.
    Tests force ops with e.g. ``ops=("Rotate",), num_ops=1, op_p=1.0, magnitude_range=(9, 9)``.
    """

    num_ops: int = 2
    magnitude_range: tuple[int, int] = (1, 9)
    op_p: float = 0.5
    cutout: bool = True
    cutout_frac: float = 1 / 3
    hflip_p: float = 0.5
    ops: tuple[str, ...] = RANDAUG_OPS

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(RANDAUG_OPS)
        if unknown or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of {RANDAUG_OPS}; unknown: {sorted(unknown)}")
        lo, hi = self.magnitude_range
        if not 0 <= lo <= hi <= 10:
            raise ValueError(f"magnitude_range must satisfy 0 <= lo <= hi <= 10, got {self.magnitude_range}")


@dataclass
class View:
    """One augmented view. Shapes are per sample; ``to_dict`` gives a ``default_collate``-friendly dict.

    image: float [3, h, w] in [0, 1]; ``IMAGE_FILL`` on invalid pixels.
    label: long [h, w], ``IGNORE_INDEX`` on ignore and every invalid pixel; None when no label was given.
    coords: float32 [2, h, w], (x, y) of each view pixel in the original image, grid_sample convention.
    valid: bool [h, w], True where the pixel shows the original image (not padding, out of bounds, cutout).
    affine: float64 [2, 3], view pixel (col, row, 1) -> ``coords``; exact for any resolution.
    coords_in_weak: strong views only, float32 [2, h, w], position of each pixel in the weak view.
    ops: what was applied (for logging), e.g. ``["hflip", "Rotate(-21)", "cutout(10:42,3:35)"]``.
    """

    image: Tensor
    label: Tensor | None
    coords: Tensor
    valid: Tensor
    affine: Tensor
    coords_in_weak: Tensor | None = None
    ops: list[str] = field(default_factory=list)

    def to_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Tensor fields only (None fields and ``ops`` left out), keys prefixed, e.g. ``strong_coords``."""
        out = {
            "image": self.image,
            "label": self.label,
            "coords": self.coords,
            "valid": self.valid,
            "affine": self.affine,
            "coords_in_weak": self.coords_in_weak,
        }
        return {prefix + k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------
# Sampling and resampling helpers


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _coords_from_affine(affine: Tensor, size: tuple[int, int]) -> Tensor:
    """[2, h, w] float32 coords of pixel centres (col, row) under a [2, 3] affine (computed in float64)."""
    h, w = size
    a = affine.to(torch.float64)
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    ys = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    out = a[:, 0].view(2, 1, 1) * xs + a[:, 1].view(2, 1, 1) * ys + a[:, 2].view(2, 1, 1)
    return out.to(torch.float32)


def _pixel_to_norm(size: tuple[int, int]) -> Tensor:
    """3x3: pixel index (col, row, 1) -> normalised coords (align_corners=False)."""
    h, w = size
    return torch.tensor(
        [[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )


def _pixel_to_centred(size: tuple[int, int]) -> Tensor:
    """3x3: pixel index -> pixel units with the origin at the image centre (torchvision's affine frame)."""
    h, w = size
    return torch.tensor([[1.0, 0.0, -(w - 1) / 2.0], [0.0, 1.0, -(h - 1) / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _as3(affine: Tensor) -> Tensor:
    return torch.cat([affine.to(torch.float64), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])


def warp_to_view(
    src: Tensor,
    coords: Tensor,
    out_size: tuple[int, int] | None = None,
    mode: Literal["bilinear", "nearest"] = "bilinear",
    fill: float = 0.0,
) -> Tensor:
    """Sample ``src`` (in the geometry ``coords`` refer to) at ``coords``, at resolution ``out_size``.

    Shapes: ``src`` [C, h0, w0] with ``coords`` [2, H, W] -> [C, h, w]; [B, C, h0, w0] with [B, 2, H, W] ->
    [B, C, h, w]; a channel-less ``src`` ([h0, w0] or [B, h0, w0], e.g. labels) gives a channel-less output.
    Rule: a ``src`` with one dim fewer than ``coords`` is channel-less. A batch of 1 on either side is
    broadcast against the other's batch.

    Output cell (i, j) of ``out_size`` (h, w) is sampled at its centre, i.e. view pixel position
    ((j + 0.5) W / w - 0.5, (i + 0.5) H / h - 0.5); the coords there are bilinearly interpolated, which is
    exact because view coords are affine (for ``out_size`` <= coords size; upsampling clamps at the border).
    ``src`` is sampled with ``align_corners=False`` and border padding, so positions within half a source cell
    of the edge take the edge value, exactly like ``F.interpolate``; positions outside the source (|x| > 1 or
    |y| > 1) get ``fill`` (use ``fill=IGNORE_INDEX`` and ``mode="nearest"`` for labels). Integer inputs are
    sampled in float and returned in their dtype (nearest is exact for class ids); float16/bfloat16 are
    sampled in float32 so the coords keep their precision.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    if coords.dim() not in (3, 4) or coords.shape[-3] != 2:
        raise ValueError(f"coords must be [2, H, W] or [B, 2, H, W], got {tuple(coords.shape)}")
    coords_batched = coords.dim() == 4
    # A src with one dim fewer than coords has no channel dim (labels); with as many dims, it has one.
    channelless = src.dim() == coords.dim() - 1 or src.dim() == 2
    s = src.unsqueeze(-3) if channelless else src
    src_batched = s.dim() == 4
    if s.dim() not in (3, 4):
        raise ValueError(f"src shape {tuple(src.shape)} does not match coords shape {tuple(coords.shape)}")
    s4 = s if src_batched else s.unsqueeze(0)
    c4 = (coords if coords_batched else coords.unsqueeze(0)).to(device=src.device, dtype=torch.float32)
    if s4.shape[0] != c4.shape[0]:
        if s4.shape[0] == 1:
            s4 = s4.expand(c4.shape[0], -1, -1, -1)
        elif c4.shape[0] == 1:
            c4 = c4.expand(s4.shape[0], -1, -1, -1)
        else:
            raise ValueError(f"batch sizes differ: src {s4.shape[0]}, coords {c4.shape[0]}")
    if out_size is not None:
        c4 = coords_at(c4, out_size)
    grid = c4.permute(0, 2, 3, 1).contiguous()
    work_dtype = s4.dtype if s4.dtype in (torch.float32, torch.float64) else torch.float32
    out = F.grid_sample(s4.to(work_dtype), grid.to(work_dtype), mode=mode, padding_mode="border", align_corners=False)
    outside = (grid.abs() > 1.0).any(dim=-1).unsqueeze(1)
    out = out.masked_fill(outside, fill)
    if not s4.dtype.is_floating_point and s4.dtype != torch.bool:
        out = out.round()
    elif s4.dtype == torch.bool:
        out = out > 0.5
    out = out.to(src.dtype)
    if not (src_batched or coords_batched):
        out = out.squeeze(0)
    return out.squeeze(-3) if channelless else out


def coords_at(coords: Tensor, out_size: tuple[int, int]) -> Tensor:
    """View coords ([2, H, W] or [B, 2, H, W]) at the centres of an ``out_size`` grid, as ``warp_to_view``
    samples them (float32). Maps of one size can be concatenated along the width and warped in one call."""
    c = coords.to(torch.float32)
    if tuple(out_size) == tuple(c.shape[-2:]):
        return c
    c4 = c if c.dim() == 4 else c.unsqueeze(0)
    c4 = F.interpolate(c4, size=tuple(out_size), mode="bilinear", align_corners=False)
    return c4 if c.dim() == 4 else c4.squeeze(0)


def downsample_valid(valid: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Conservative downsampling of a valid mask ([H, W] or [B, H, W]) to ``out_size``.

    An output cell is valid only if every input pixel overlapping it is valid (cells span
    [floor(i H / h), ceil((i + 1) H / h)) as in ``adaptive_max_pool2d``), so a loss at low resolution never
    touches padding or cutout pixels, even partially.
    """
    v = valid if valid.dim() == 3 else valid.unsqueeze(0)
    invalid = F.adaptive_max_pool2d((~v.bool()).float().unsqueeze(1), tuple(out_size)).squeeze(1) > 0
    out = ~invalid
    return out if valid.dim() == 3 else out.squeeze(0)


# ----------------------------------------------------------------------------------------------------------
# Weak view


def _bilinear_window(image: Tensor, py: Tensor, px: Tensor) -> Tensor:
    """Bilinear samples of ``image`` [C, H, W] at rows ``py`` x columns ``px`` (pixel units), float in [0, 1].

    Only the window of source pixels the taps touch is converted to float and sampled, so the cost scales with
    the output, not the source. Positions are clamped to the image (border padding, as F.interpolate and
    warp_to_view do); the window holds every tap, so clamping at an inner window edge never happens.
    """
    H, W = image.shape[-2:]

    def window(p: Tensor, n: int) -> tuple[int, int, Tensor]:
        p = p.to(torch.float32).clamp(0, n - 1)
        a, b = int(p.min().floor()), min(n, int(p.max().floor()) + 2)
        return a, b, (2 * (p - a) + 1) / (b - a) - 1  # normalised within the window, align_corners=False

    ya, yb, yn = window(py, H)
    xa, xb, xn = window(px, W)
    win = image[:, ya:yb, xa:xb].to(torch.float32)
    if image.dtype == torch.uint8:
        win = win.div_(255.0)
    grid = torch.stack(torch.broadcast_tensors(xn.view(1, -1), yn.view(-1, 1)), dim=-1)
    return F.grid_sample(win[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]


def make_weak_view(image: Tensor, label: Tensor | None, cfg: WeakViewConfig, generator: torch.Generator) -> View:
    """Random rescale by s ~ U(scale_range) (times ``base_width / W`` when set), random crop to
    ``cfg.crop_size``, hflip with p ``hflip_p``.

    When the rescaled image is smaller than the crop along a side, it is placed at a uniformly random offset
    inside the crop; the rest is padding (invalid, image ``IMAGE_FILL``, label ``IGNORE_INDEX``).
    ``image``: uint8 [3, H, W] (float in [0, 1] is accepted too); ``label``: [H, W] integer class ids with
    ``IGNORE_INDEX`` for ignore, or None. Random draws, in order: scale, crop row, crop col, flip.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got {tuple(image.shape)}")
    H, W = image.shape[-2:]
    if label is not None and tuple(label.shape) != (H, W):
        raise ValueError(f"label shape {tuple(label.shape)} != image size {(H, W)}")
    ch, cw = cfg.crop_size
    s = cfg.scale_range[0] + (cfg.scale_range[1] - cfg.scale_range[0]) * _rand(generator)
    if cfg.base_width is not None:  # the views come from a larger (or smaller) image than inference reads
        s *= cfg.base_width / W
    rh, rw = max(1, round(H * s)), max(1, round(W * s))
    # Offset of the crop window in the rescaled image; negative when the image is smaller (padding first).
    top = _randint(generator, min(0, rh - ch), max(0, rh - ch))
    left = _randint(generator, min(0, rw - cw), max(0, rw - cw))
    flip = _rand(generator) < cfg.hflip_p

    # View pixel (j, i) sits at rescaled pixel (left + j', top + i), j' = cw - 1 - j when flipped; in the
    # original's normalised coords that is x = 2 (left + j' + 0.5) / rw - 1 (the scale cancels out).
    if flip:
        ax = (-2.0 / rw, 0.0, 2.0 * (left + cw - 0.5) / rw - 1.0)
    else:
        ax = (2.0 / rw, 0.0, 2.0 * (left + 0.5) / rw - 1.0)
    ay = (0.0, 2.0 / rh, 2.0 * (top + 0.5) / rh - 1.0)
    affine = torch.tensor([ax, ay], dtype=torch.float64)
    coords = _coords_from_affine(affine, (ch, cw))
    valid = torch.zeros((ch, cw), dtype=torch.bool)
    r0, r1 = max(top, 0), min(top + ch, rh)
    c0, c1 = max(left, 0), min(left + cw, rw)
    valid[r0 - top : r1 - top, c0 - left : c1 - left] = True
    if flip:
        valid = valid.flip(-1)
    # The weak geometry is separable: column j reads source column px[j], row i source row py[i] (pixel units,
    # unnormalised exactly as grid_sample does, so ties round the same way as in warp_to_view).
    px = ((coords[0, 0, :] + 1) * W - 1) / 2
    py = ((coords[1, :, 0] + 1) * H - 1) / 2

    if s >= 1.0:
        # Upscaling: antialiasing is a no-op, so bilinear sampling of only the crop's pixels equals resize + crop
        # and avoids resizing the whole image to 1.5x.
        out_image = _bilinear_window(image, py, px)
    else:
        # Downscaling: antialiased resize (pixel-centre mapping (x + 0.5) W / rw - 0.5, as plain bilinear).
        resized = TF.resize(image, [rh, rw], interpolation=InterpolationMode.BILINEAR, antialias=True)
        resized = resized.float().div_(255.0) if resized.dtype == torch.uint8 else resized.float()
        out_image = torch.full((image.shape[0], ch, cw), IMAGE_FILL, dtype=torch.float32)
        out_image[:, r0 - top : r1 - top, c0 - left : c1 - left] = resized[:, r0:r1, c0:c1]
        if flip:
            out_image = out_image.flip(-1)
    out_image = out_image.masked_fill(~valid, IMAGE_FILL)

    out_label = None
    if label is not None:
        # Nearest sampling at the exact coords (the rule of warp_to_view), so view labels and any warped label
        # map agree pixel for pixel, which torch's floor-based "nearest" resize would not guarantee.
        rows = py.round().clamp(0, H - 1).long()
        cols = px.round().clamp(0, W - 1).long()
        out_label = label.index_select(0, rows).index_select(1, cols).long()
        out_label = out_label.masked_fill(~valid, IGNORE_INDEX)
    ops = [f"scale({s:.3f})", f"crop({top},{left})"] + (["hflip"] if flip else [])
    return View(image=out_image, label=out_label, coords=coords, valid=valid, affine=affine, ops=ops)


# ----------------------------------------------------------------------------------------------------------
# Strong view


def _geometric_inverse(op: str, m: int, sign: float, size: tuple[int, int]) -> tuple[Tensor, str]:
    """3x3 inverse map (output -> input) of a geometric op in the centred pixel frame, and a log string.

    Same matrices as torchvision's ``_get_inverse_affine_matrix`` (centre = image centre, scale 1): rotation
    by +angle is counter-clockwise on screen; ShearX v is x_in = x + v y (torchvision shear atan(v) degrees,
    PIL's (1, v, 0, 0, 1, 0)); translation by +t moves content right/down. Shears are about the image centre
    (the public code shears about the top-left corner, which pushes up to 30% of the image out of frame).
    """
    h, w = size
    if op == "Rotate":
        angle = sign * 3.0 * m
        r = math.radians(angle)
        mat = [[math.cos(r), math.sin(r), 0.0], [-math.sin(r), math.cos(r), 0.0]]
        desc = f"Rotate({angle:g})"
    elif op == "ShearX":
        v = sign * 0.03 * m
        mat = [[1.0, v, 0.0], [0.0, 1.0, 0.0]]
        desc = f"ShearX({v:.3f})"
    elif op == "ShearY":
        v = sign * 0.03 * m
        mat = [[1.0, 0.0, 0.0], [v, 1.0, 0.0]]
        desc = f"ShearY({v:.3f})"
    elif op == "TranslateX":
        t = int(sign) * int(0.03 * m * w)
        mat = [[1.0, 0.0, -float(t)], [0.0, 1.0, 0.0]]
        desc = f"TranslateX({t})"
    elif op == "TranslateY":
        t = int(sign) * int(0.03 * m * h)
        mat = [[1.0, 0.0, 0.0], [0.0, 1.0, -float(t)]]
        desc = f"TranslateY({t})"
    else:
        raise ValueError(f"not a geometric op: {op}")
    return _as3(torch.tensor(mat, dtype=torch.float64)), desc


def _photometric(op: str, m: int, image: Tensor) -> tuple[Tensor, str]:
    """Apply a photometric op (v2 colour kernels, float image in [0, 1]); magnitudes as the public pool."""
    factor = 0.05 + 0.09 * m  # PIL ImageEnhance factor: 0.14..0.86 for m = 1..9 (public code's range)
    if op == "Identity":
        return image, "Identity"
    if op == "AutoContrast":
        return TF.autocontrast(image), "AutoContrast"
    if op == "Equalize":
        return TF.equalize(image), "Equalize"
    if op == "Brightness":
        return TF.adjust_brightness(image, factor), f"Brightness({factor:.2f})"
    if op == "Color":
        return TF.adjust_saturation(image, factor), f"Color({factor:.2f})"
    if op == "Contrast":
        return TF.adjust_contrast(image, factor), f"Contrast({factor:.2f})"
    if op == "Sharpness":
        return TF.adjust_sharpness(image, factor), f"Sharpness({factor:.2f})"
    if op == "Posterize":
        bits = 4 + int(0.4 * m)
        return TF.posterize(image, bits), f"Posterize({bits})"
    if op == "Solarize":
        threshold = (256 - int(25.6 * m)) / 255.0
        return TF.solarize(image, threshold), f"Solarize({threshold:.3f})"
    raise ValueError(f"not a photometric op: {op}")


def make_strong_view(weak: View, cfg: StrongViewConfig, generator: torch.Generator) -> View:
    """RandAugment + cutout applied on top of ``weak`` (T' after T); same size as the weak view.

    Photometric ops touch the image only; geometric ops (and the flip) are composed into one affine and
    applied to image (bilinear), label (nearest) and valid mask in a single resampling. Photometric ops are
    applied to the weak image before that warp, in their drawn order, so AutoContrast/Equalize statistics
    are not skewed by the warp's fill (pixelwise ops commute with the warp up to interpolation). ``coords``
    refer to the ORIGINAL image (composition with ``weak.affine``); ``coords_in_weak`` to the weak view, to
    bring maps computed on the weak view (EMA features / z_T) into this view. valid = weak.valid at the
    sampled position AND inside the weak view AND not cutout; label is ``IGNORE_INDEX`` and image
    ``IMAGE_FILL`` where invalid.
    Random draws, in order: flip; per op: op, magnitude, sign, apply; cutout centre row, col.
    """
    h, w = weak.image.shape[-2:]
    size = (h, w)
    inv = torch.eye(3, dtype=torch.float64)  # strong centred pixel -> weak centred pixel
    log: list[str] = []
    if _rand(generator) < cfg.hflip_p:
        inv = inv @ torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
        log.append("hflip")
    image = weak.image
    lo, hi = cfg.magnitude_range
    for _ in range(cfg.num_ops):
        op = cfg.ops[_randint(generator, 0, len(cfg.ops) - 1)]
        m = _randint(generator, lo, hi)
        sign = 1.0 if _rand(generator) < 0.5 else -1.0
        if _rand(generator) >= cfg.op_p:
            continue
        if op in GEOMETRIC_OPS:
            op_inv, desc = _geometric_inverse(op, m, sign, size)
            # strong = op_n(...op_1(weak)): the inverse applies op_n^-1 first, i.e. multiplies on the right.
            inv = inv @ op_inv
        else:
            image, desc = _photometric(op, m, image)
        log.append(desc)

    p2c = _pixel_to_centred(size)
    pix_to_weak_pix = torch.linalg.inv(p2c) @ inv @ p2c
    affine_in_weak = (_pixel_to_norm(size) @ pix_to_weak_pix)[:2]
    affine = (_as3(weak.affine) @ pix_to_weak_pix)[:2]
    coords_in_weak = _coords_from_affine(affine_in_weak, size)
    coords = _coords_from_affine(affine, size)

    label = weak.label
    if torch.equal(inv, torch.eye(3, dtype=torch.float64)):
        # No geometric op drawn: copy rather than resample, so the pixels stay bit-exact (and it is faster).
        valid = weak.valid.clone()
    elif torch.equal(inv, torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))):
        image, valid = image.flip(-1), weak.valid.flip(-1)
        label = None if label is None else label.flip(-1)
    else:
        image = warp_to_view(image, coords_in_weak, None, "bilinear", fill=IMAGE_FILL)
        # Valid and label share one nearest resampling; out-of-bounds gives valid 0, and the label is set to
        # IGNORE_INDEX wherever invalid below.
        nearest = weak.valid[None].float()
        if label is not None:
            nearest = torch.cat([nearest, label[None].float()])
        nearest = warp_to_view(nearest, coords_in_weak, None, "nearest", fill=0.0)
        valid = nearest[0] > 0.5
        label = None if label is None else nearest[1].long()

    if cfg.cutout:
        side = int(min(h, w) * cfg.cutout_frac)
        cy, cx = _rand(generator) * h, _rand(generator) * w
        # Box placement as the public CutoutAbs: shift by half a side, clip at the image border.
        y0, x0 = int(max(0.0, cy - side / 2.0)), int(max(0.0, cx - side / 2.0))
        y1, x1 = int(min(h, y0 + side)), int(min(w, x0 + side))
        if side > 0:
            valid[y0:y1, x0:x1] = False
            log.append(f"cutout({y0}:{y1},{x0}:{x1})")
    image = image.masked_fill(~valid, IMAGE_FILL)
    if label is not None:
        label = label.masked_fill(~valid, IGNORE_INDEX)
    return View(
        image=image,
        label=label,
        coords=coords,
        valid=valid,
        affine=affine,
        coords_in_weak=coords_in_weak,
        ops=log,
    )


__all__ = [
    "GEOMETRIC_OPS",
    "IGNORE_INDEX",
    "IMAGE_FILL",
    "PHOTOMETRIC_OPS",
    "RANDAUG_OPS",
    "StrongViewConfig",
    "View",
    "WeakViewConfig",
    "downsample_valid",
    "make_strong_view",
    "make_weak_view",
    "warp_to_view",
]
