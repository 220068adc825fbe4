"""Geometry replay tests for pipeline.data.views: patterns pushed through views must be recoverable from coords."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.data.views import (
    GEOMETRIC_OPS,
    IGNORE_INDEX,
    PHOTOMETRIC_OPS,
    StrongViewConfig,
    View,
    WeakViewConfig,
    _coords_from_affine,
    _geometric_inverse,
    _pixel_to_centred,
    _pixel_to_norm,
    coords_at,
    downsample_valid,
    make_strong_view,
    make_weak_view,
    warp_to_view,
)

H, W = 96, 160  # small original image; multiples of 8 so a stride-8 map tiles it exactly
NO_STRONG = dict(num_ops=0, cutout=False, hflip_p=0.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def smooth_image() -> torch.Tensor:
    """Low-frequency uint8 image: bilinear point sampling and antialiased resizing nearly agree on it."""
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    img = torch.stack(
        [128 + 90 * torch.sin(xx / 23.0), 128 + 90 * torch.cos(yy / 17.0), 40 + 170 * (xx + yy) / (H + W)]
    )
    return img.round().to(torch.uint8)


@pytest.fixture(scope="module")
def block_label() -> torch.Tensor:
    """Classes on a grid of 32 x 32 blocks (3 x 5 blocks, 15 classes): hand-checkable quadrant pattern."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return ((yy // 32) * 5 + xx // 32).to(torch.uint8)


def _identity_coords(h: int, w: int) -> torch.Tensor:
    return _coords_from_affine(_pixel_to_norm((h, w))[:2], (h, w))


# ------------------------------------------------------------------------------------------------ weak view


def test_weak_flip_only(smooth_image: torch.Tensor, block_label: torch.Tensor) -> None:
    cfg = WeakViewConfig(crop_size=(H, W), scale_range=(1.0, 1.0), hflip_p=1.0)
    v = make_weak_view(smooth_image, block_label, cfg, _gen(0))
    # View pixel (0, 0) shows the original's top-right pixel: x = 1 - 1/W, y = -1 + 1/H.
    assert v.coords[:, 0, 0].tolist() == pytest.approx([1 - 1 / W, -1 + 1 / H], abs=1e-6)
    assert v.coords[:, -1, -1].tolist() == pytest.approx([-1 + 1 / W, 1 - 1 / H], abs=1e-6)
    assert v.valid.all()
    assert torch.equal(v.label, block_label.long().flip(-1))
    assert torch.allclose(v.image, smooth_image.float().flip(-1) / 255, atol=1e-6)
    rec = warp_to_view(smooth_image.float() / 255, v.coords)
    assert torch.allclose(rec, v.image, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_weak_rescale_crop_flip_replay(smooth_image: torch.Tensor, block_label: torch.Tensor, seed: int) -> None:
    cfg = WeakViewConfig(crop_size=(64, 96), scale_range=(0.5, 1.5), hflip_p=0.5)
    v = make_weak_view(smooth_image, block_label, cfg, _gen(seed))
    assert v.image.shape == (3, 64, 96) and v.image.dtype == torch.float32
    assert v.label.shape == (64, 96) and v.label.dtype == torch.long
    assert v.coords.shape == (2, 64, 96) and v.valid.dtype == torch.bool
    rec = warp_to_view(smooth_image.float() / 255, v.coords)
    # Antialiased resize vs bilinear point sampling on a smooth image: a couple of grey levels at most.
    assert (rec - v.image)[:, v.valid].abs().max() < 0.03
    lab = warp_to_view(block_label, v.coords, mode="nearest", fill=IGNORE_INDEX)
    assert torch.equal(lab.long()[v.valid], v.label[v.valid])
    assert (v.label[~v.valid] == IGNORE_INDEX).all()


@pytest.mark.parametrize("crop", [(64, 96), (140, 220)])  # inside the image / larger than it (padding)
def test_weak_upscale_is_exact_bilinear(smooth_image: torch.Tensor, block_label: torch.Tensor, crop: tuple) -> None:
    # For s >= 1 antialiasing is a no-op: the view must equal bilinear sampling of the original at its coords.
    for seed in range(3):
        v = make_weak_view(smooth_image, block_label, WeakViewConfig(crop, (1.05, 1.4)), _gen(seed))
        rec = warp_to_view(smooth_image.float() / 255, v.coords)
        assert (rec - v.image)[:, v.valid].abs().max() < 1e-5
        assert (v.image[:, ~v.valid] == 0).all()


def test_weak_padding_is_invalid(smooth_image: torch.Tensor, block_label: torch.Tensor) -> None:
    # Half-size image (48 x 80) inside a 64 x 100 crop: everything else is padding.
    cfg = WeakViewConfig(crop_size=(64, 100), scale_range=(0.5, 0.5), hflip_p=0.0)
    v = make_weak_view(smooth_image, block_label, cfg, _gen(3))
    assert int(v.valid.sum()) == 48 * 80
    assert (v.label[~v.valid] == IGNORE_INDEX).all()
    assert (v.label[v.valid] != IGNORE_INDEX).all()
    assert (v.image[:, ~v.valid] == 0).all()
    # Padding pixels look outside the original image; valid ones inside.
    assert (v.coords[:, ~v.valid].abs().amax(0) > 1).all()
    assert (v.coords[:, v.valid].abs() < 1).all()


# ---------------------------------------------------------------------------------------------- strong view


def _weak(smooth_image: torch.Tensor, block_label: torch.Tensor, seed: int = 11) -> View:
    cfg = WeakViewConfig(crop_size=(80, 128), scale_range=(0.8, 1.2), hflip_p=0.5)
    return make_weak_view(smooth_image, block_label, cfg, _gen(seed))


def _near_boundary(lab: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3 x 3 neighbourhood holds more than one class."""
    x = lab.float()[None, None]
    return (F.max_pool2d(x, 3, 1, 1) != -F.max_pool2d(-x, 3, 1, 1))[0, 0]


@pytest.mark.parametrize("op", GEOMETRIC_OPS)
@pytest.mark.parametrize("rescale", [False, True])
def test_strong_geometric_op_replay(
    smooth_image: torch.Tensor, block_label: torch.Tensor, op: str, rescale: bool
) -> None:
    if rescale:
        weak = _weak(smooth_image, block_label)
    else:  # integer crop + flip only: the weak label is an exact copy of the original's pixels
        weak = make_weak_view(smooth_image, block_label, WeakViewConfig((80, 128), (1.0, 1.0)), _gen(11))
    cfg = StrongViewConfig(num_ops=1, ops=(op,), op_p=1.0, magnitude_range=(9, 9), cutout=False, hflip_p=0.0)
    s = make_strong_view(weak, cfg, _gen(5))
    assert s.ops and s.ops[0].startswith(op)
    assert not torch.equal(s.coords, weak.coords)  # the op moved pixels
    assert (~s.valid).any()  # magnitude 9 pushes part of the view out of frame
    # Labels: the original pattern warped straight into the strong view equals the strong label.
    lab = warp_to_view(block_label, s.coords, mode="nearest", fill=IGNORE_INDEX).long()
    agree = lab == s.label
    if rescale:
        # Nearest of a nearest-rescaled label vs one nearest sample: may differ by a pixel at class edges only.
        assert agree[s.valid].float().mean() >= 0.97
        assert _near_boundary(lab)[s.valid & ~agree].all()
    else:
        assert agree[s.valid].float().mean() >= 0.999
    assert (s.label[~s.valid] == IGNORE_INDEX).all()
    # coords_in_weak reproduces the strong image from the weak one (no photometric op, no cutout).
    rec = warp_to_view(weak.image, s.coords_in_weak)
    assert torch.allclose(rec[:, s.valid], s.image[:, s.valid], atol=1e-6)
    # coords compose: weak coords sampled at coords_in_weak are the strong coords (affine -> bilinear is exact).
    # Only where no bilinear tap falls off the weak view (the border clamps there).
    inner = s.valid & (s.coords_in_weak.abs() <= 1 - 2 / 80).all(0)
    comp = warp_to_view(weak.coords, s.coords_in_weak)
    assert torch.allclose(comp[:, inner], s.coords[:, inner], atol=1e-5)
    # And the original image warped by the composed coords agrees with the strong image.
    rec0 = warp_to_view(smooth_image.float() / 255, s.coords)
    assert (rec0 - s.image)[:, s.valid].abs().max() < 0.05


@pytest.mark.parametrize(
    ("op", "kwargs"),
    [
        ("Rotate", dict(angle=-21.0, translate=[0.0, 0.0], shear=[0.0, 0.0])),
        ("ShearX", dict(angle=0.0, translate=[0.0, 0.0], shear=[16.699244, 0.0])),  # atan(0.3) in degrees
        ("ShearY", dict(angle=0.0, translate=[0.0, 0.0], shear=[0.0, 16.699244])),
        ("TranslateX", dict(angle=0.0, translate=[-12.0, 0.0], shear=[0.0, 0.0])),
        ("TranslateY", dict(angle=0.0, translate=[0.0, 7.0], shear=[0.0, 0.0])),
    ],
)
def test_geometric_ops_match_torchvision_affine(op: str, kwargs: dict) -> None:
    h, w = 40, 60
    img = torch.randint(0, 200, (1, h, w)).float()
    m, sign = {"Rotate": (7, -1.0), "TranslateX": (7, -1.0), "TranslateY": (6, 1.0)}.get(op, (10, 1.0))
    inv, _ = _geometric_inverse(op, m, sign, (h, w))
    p2c = _pixel_to_centred((h, w))
    coords = _coords_from_affine((_pixel_to_norm((h, w)) @ torch.linalg.inv(p2c) @ inv @ p2c)[:2], (h, w))
    ours = warp_to_view(img, coords, mode="nearest", fill=-1.0)
    ref = TF.affine(img, scale=1.0, interpolation=InterpolationMode.NEAREST, fill=-1.0, **kwargs)
    assert (ours == ref).float().mean() >= 0.995


def test_strong_flip_only_is_exact(smooth_image: torch.Tensor, block_label: torch.Tensor) -> None:
    weak = _weak(smooth_image, block_label)
    s = make_strong_view(weak, StrongViewConfig(num_ops=0, cutout=False, hflip_p=1.0), _gen(0))
    assert torch.allclose(s.image, weak.image.flip(-1), atol=1e-6)
    assert torch.equal(s.label, weak.label.flip(-1))
    assert torch.allclose(s.coords, weak.coords.flip(-1), atol=1e-6)


def test_cutout_invalid_and_zeroed(smooth_image: torch.Tensor, block_label: torch.Tensor) -> None:
    weak = make_weak_view(smooth_image, block_label, WeakViewConfig((H, W), (1.0, 1.0), 0.0), _gen(0))
    s = make_strong_view(weak, StrongViewConfig(num_ops=0, hflip_p=0.0, cutout=True), _gen(2))
    side = H // 3  # min(H, W) / 3
    hole = ~s.valid
    rows, cols = hole.any(1).nonzero().squeeze(1), hole.any(0).nonzero().squeeze(1)
    assert 0 < rows.numel() <= side and 0 < cols.numel() <= side
    assert int(hole.sum()) == rows.numel() * cols.numel()  # one axis-aligned box
    assert (s.image[:, hole] == 0).all() and (s.label[hole] == IGNORE_INDEX).all()
    assert torch.allclose(s.image[:, ~hole], weak.image[:, ~hole], atol=1e-6)
    assert torch.equal(s.coords, weak.coords)  # cutout moves nothing


@pytest.mark.parametrize("op", [o for o in PHOTOMETRIC_OPS if o != "Identity"])
def test_photometric_ops_touch_image_only(smooth_image: torch.Tensor, block_label: torch.Tensor, op: str) -> None:
    weak = _weak(smooth_image, block_label)
    cfg = StrongViewConfig(num_ops=1, ops=(op,), op_p=1.0, magnitude_range=(9, 9), cutout=False, hflip_p=0.0)
    s = make_strong_view(weak, cfg, _gen(1))
    assert not torch.allclose(s.image, weak.image, atol=1e-5)  # some are subtle on a smooth image
    assert s.image.min() >= 0 and s.image.max() <= 1
    assert torch.allclose(s.coords, weak.coords, atol=1e-6)
    assert torch.equal(s.label, weak.label) and torch.equal(s.valid, weak.valid)


def test_lowres_map_warps_to_quarter_resolution(smooth_image: torch.Tensor, block_label: torch.Tensor) -> None:
    # Stride-8 soft map of the original (as the network would give on the full image): block one-hot averages.
    onehot = F.one_hot(block_label.long(), 15).permute(2, 0, 1).float()
    soft = F.avg_pool2d(onehot[None], 8)[0]  # [15, H/8, W/8]
    weak = _weak(smooth_image, block_label, seed=4)
    cfg = StrongViewConfig(num_ops=1, ops=("Rotate",), op_p=1.0, magnitude_range=(5, 5), cutout=True)
    strong = make_strong_view(weak, cfg, _gen(8))
    for v in (weak, strong):
        q = (v.image.shape[1] // 4, v.image.shape[2] // 4)
        pred = warp_to_view(soft, v.coords, q).argmax(0)
        # Reference: the view's own label at each quarter cell centre (cells are 4 x 4 pixels: the centre is a
        # pixel corner, so compare against the label of the original at the same coords, nearest).
        ref = warp_to_view(block_label, v.coords, q, mode="nearest", fill=IGNORE_INDEX).long()
        ok = downsample_valid(v.valid, q)
        assert ok.float().mean() > 0.3
        assert (pred[ok] == ref[ok]).float().mean() >= 0.95
        # The conservative mask never keeps a cell over an invalid pixel.
        assert (ref[ok] != IGNORE_INDEX).all()


def test_strong_coords_in_weak_carries_weak_maps(smooth_image: torch.Tensor, block_label: torch.Tensor) -> None:
    # A map computed on the weak view (e.g. z_T at stride 4) is brought into the strong view by coords_in_weak.
    weak = _weak(smooth_image, block_label, seed=7)
    cfg = StrongViewConfig(num_ops=2, ops=("Rotate", "TranslateX"), op_p=1.0, magnitude_range=(6, 6))
    s = make_strong_view(weak, cfg, _gen(3))
    weak_map = F.one_hot(weak.label.clamp(max=14), 15).permute(2, 0, 1).float()
    weak_map = F.avg_pool2d(weak_map[None], 4)[0]  # [15, 20, 32] on the weak view
    q = (20, 32)
    pred = warp_to_view(weak_map, s.coords_in_weak, q).argmax(0)
    ref = warp_to_view(block_label, s.coords, q, mode="nearest", fill=IGNORE_INDEX).long()
    ok = downsample_valid(s.valid, q)
    assert (pred[ok] == ref[ok]).float().mean() >= 0.9


# ----------------------------------------------------------------------------------------------- randomness


def test_determinism_and_no_global_rng(smooth_image: torch.Tensor, block_label: torch.Tensor) -> None:
    wcfg, scfg = WeakViewConfig((64, 96)), StrongViewConfig(op_p=1.0)

    def views(seed: int) -> tuple[View, View]:
        g = _gen(seed)
        w = make_weak_view(smooth_image, block_label, wcfg, g)
        return w, make_strong_view(w, scfg, g)

    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = views(0)
    torch.manual_seed(456)  # the global RNG must not matter
    b = views(0)
    c = views(1)
    torch.set_rng_state(state)
    for va, vb in zip(a, b, strict=True):
        assert va.ops == vb.ops
        for k, t in va.to_dict().items():
            assert torch.equal(t, vb.to_dict()[k]), k
    assert a[1].ops != c[1].ops or not torch.equal(a[1].image, c[1].image)
    assert not torch.equal(a[0].coords, c[0].coords)


# -------------------------------------------------------------------------------------------------- helpers


def test_warp_to_view_cell_centres_match_interpolate() -> None:
    # With identity coords, sampling at out_size must be F.interpolate(align_corners=False) exactly: cell centres
    # sit at (j + 0.5) * W / w - 0.5 in view pixels.
    src = torch.rand(2, 4, 12, 20)
    coords = _identity_coords(48, 80).expand(2, -1, -1, -1)
    for out in [(12, 20), (6, 10), (24, 40), (5, 7)]:
        ref = F.interpolate(src, size=out, mode="bilinear", align_corners=False)
        assert torch.allclose(warp_to_view(src, coords, out), ref, atol=1e-5), out


def test_coords_side_by_side_warp_in_one_call() -> None:
    # Stage 1 samples the EMA features at two views' pixels in one call: coords_at both maps, concatenated along
    # the width, must give the two separate warps side by side (also with pixels outside the source).
    gen = torch.Generator().manual_seed(0)
    src = torch.rand(2, 5, 12, 20, generator=gen)
    a = _identity_coords(48, 80).expand(2, -1, -1, -1)
    b = a.flip(-1) * 1.2 - 3.0  # mirrored, scaled, partly outside
    out = (12, 20)
    both = torch.cat([coords_at(a, out), coords_at(b, out)], dim=-1)
    assert both.shape == (2, 2, 12, 40) and both.dtype == torch.float32
    joint = warp_to_view(src, both)
    assert torch.equal(joint[..., :20], warp_to_view(src, a, out))
    assert torch.equal(joint[..., 20:], warp_to_view(src, b, out))
    assert coords_at(a[0], out).shape == (2, 12, 20) and torch.equal(coords_at(a, (48, 80)), a)


def test_warp_to_view_shapes_fill_and_dtypes() -> None:
    lab = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    # Coords of a 2 x 4 view whose right half looks outside the original.
    coords = torch.stack(
        torch.meshgrid(torch.tensor([-0.5, 0.5]), torch.tensor([-0.5, 0.5, 1.5, 2.5]), indexing="ij")[::-1]
    )
    out = warp_to_view(lab, coords, mode="nearest", fill=IGNORE_INDEX)
    assert out.dtype == torch.uint8
    assert out.tolist() == [[1, 2, 255, 255], [3, 4, 255, 255]]
    # Batched channel-less, batched with channels, bool, and half precision.
    labs, grids = lab[None].expand(3, -1, -1), coords[None].expand(3, -1, -1, -1)
    assert warp_to_view(labs, grids, mode="nearest").shape == (3, 2, 4)
    assert warp_to_view(torch.rand(3, 5, 2, 2), coords[None], (1, 2)).shape == (3, 5, 1, 2)
    v = warp_to_view(torch.ones(2, 2, dtype=torch.bool), coords, mode="nearest")
    assert v.dtype == torch.bool and v.tolist() == [[True, True, False, False]] * 2
    assert warp_to_view(torch.ones(1, 2, 2, dtype=torch.float16), coords).dtype == torch.float16


def test_downsample_valid_is_conservative() -> None:
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[0, 0] = False
    valid[5, 7] = False
    assert downsample_valid(valid, (2, 2)).tolist() == [[False, True], [True, False]]
    assert downsample_valid(valid[None], (4, 4)).shape == (1, 4, 4)
    assert int(downsample_valid(valid, (4, 4)).sum()) == 14
    # Non-integer ratio: every cell overlapping an invalid pixel is invalid.
    assert downsample_valid(valid, (3, 3)).tolist() == [[False, True, True], [True, True, False], [True, True, False]]


def test_to_dict_collates(smooth_image: torch.Tensor, block_label: torch.Tensor) -> None:
    items = []
    for seed in range(2):
        g = _gen(seed)
        w = make_weak_view(smooth_image, block_label, WeakViewConfig((64, 96)), g)
        s = make_strong_view(w, StrongViewConfig(), g)
        items.append(w.to_dict("weak_") | s.to_dict("strong_"))
    batch = default_collate(items)
    assert batch["strong_coords_in_weak"].shape == (2, 2, 64, 96)
    assert batch["weak_label"].shape == (2, 64, 96) and batch["weak_affine"].shape == (2, 2, 3)
    assert "weak_coords_in_weak" not in batch
    # Batched warping with collated coords.
    feats = torch.rand(2, 8, H // 8, W // 8)
    assert warp_to_view(feats, batch["weak_coords"], (16, 24)).shape == (2, 8, 16, 24)
    assert downsample_valid(batch["strong_valid"], (16, 24)).shape == (2, 16, 24)


def test_unlabelled_target_image(smooth_image: torch.Tensor) -> None:
    g = _gen(0)
    w = make_weak_view(smooth_image, None, WeakViewConfig((64, 96)), g)
    s = make_strong_view(w, StrongViewConfig(op_p=1.0), g)
    assert w.label is None and s.label is None
    assert set(s.to_dict()) == {"image", "coords", "valid", "affine", "coords_in_weak"}


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        StrongViewConfig(ops=("Invert",))
    with pytest.raises(ValueError):
        StrongViewConfig(magnitude_range=(5, 11))
    with pytest.raises(ValueError):
        WeakViewConfig(crop_size=(0, 10))
