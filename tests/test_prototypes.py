"""Hand-checked values for pipeline.maths.prototypes, plus a 2-process gloo test of the DDP prototype updates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.maths.prototypes import (
    PrototypeAccumulator,
    PrototypeBank,
    class_feature_sums,
    proto_logits,
    proto_weights,
)
from pipeline.maths.selection import rectify

# One pixel with feature f = (0, 0); prototypes eta_0 = (3, 4) (distance 5) and eta_1 = (0, 1) (distance 1).
FEAT = torch.zeros(1, 2, 1, 1)
PROTOS = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
# tau = 1: omega = softmax(-5, -1) = (1 / (1 + e^4), e^4 / (1 + e^4)) = (0.0179862, 0.9820138).
W0 = 1.0 / (1.0 + math.exp(4.0))


def test_proto_weights_hand_value() -> None:
    w = proto_weights(FEAT, PROTOS, tau=1.0)
    assert w.shape == (1, 2, 1, 1)
    assert w[0, :, 0, 0].tolist() == pytest.approx([W0, 1 - W0], rel=1e-5)
    # tau = 2: softmax(-2.5, -0.5) -> omega_0 = 1 / (1 + e^2) = 0.1192029.
    assert proto_weights(FEAT, PROTOS, tau=2.0)[0, 0, 0, 0].item() == pytest.approx(0.11920292, rel=1e-5)
    assert proto_logits(FEAT, PROTOS, 1.0)[0, :, 0, 0].tolist() == pytest.approx([-5.0, -1.0], rel=1e-5)


def test_proto_logits_empty_prototypes_and_float32() -> None:
    # Prototype 1 empty: it takes the mean logit of the initialised ones (here the only one, -5), a finite
    # logit, so omega is (1/2, 1/2); all empty: zeros (uniform), never NaN.
    logits = proto_logits(FEAT, PROTOS, 1.0, torch.tensor([True, False]))
    assert logits[0, :, 0, 0].tolist() == pytest.approx([-5.0, -5.0], rel=1e-5)
    assert proto_weights(FEAT, PROTOS, 1.0, torch.tensor([True, False]))[0, :, 0, 0].tolist() == pytest.approx(
        [0.5, 0.5]
    )
    none = proto_weights(FEAT, PROTOS, 1.0, torch.tensor([False, False]))
    assert none[0, :, 0, 0].tolist() == [0.5, 0.5]
    # float32 even under autocast, and a finite gradient when a feature sits exactly on a prototype.
    feat = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proto_logits(feat.bfloat16(), PROTOS, 1.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(feat.grad).all()


def test_proto_logits_equal_direct_distances_in_both_memory_formats() -> None:
    # The ||f||^2 - 2 f.eta + ||eta||^2 expansion (one batched GEMM) against the [B, K, D, h, w] difference,
    # on NCHW and NHWC (channels_last) features, values and gradients.
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 8, 5, 7, generator=gen) * 3
    protos = torch.randn(4, 8, generator=gen)
    direct = -(feat.unsqueeze(1) - protos.view(1, 4, 8, 1, 1)).norm(dim=2) / 0.5
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        f = feat.clone().contiguous(memory_format=fmt).requires_grad_()
        out = proto_logits(f, protos, 0.5)
        torch.testing.assert_close(out, direct, atol=1e-4, rtol=1e-5)
        out.sum().backward()
        grads.append(f.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_never_seen_class_keeps_a_finite_logit_and_can_be_chosen() -> None:
    # Three classes, prototype 2 never initialised. Distances to prototypes 0/1: 1 and 3 -> logits -1, -3;
    # class 2 gets their mean, -2: finite. omega = softmax(-1, -3, -2) = (0.665241, 0.090031, 0.244728).
    feat = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
    protos = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    init = torch.tensor([True, True, False])
    logits = proto_logits(feat, protos, 1.0, init)
    assert torch.isfinite(logits).all()
    assert logits[0, :, 0, 0].tolist() == pytest.approx([-1.0, -3.0, -2.0], rel=1e-5)
    omega = torch.softmax(logits, dim=1)
    assert omega[0, :, 0, 0].tolist() == pytest.approx([0.665241, 0.090031, 0.244728], rel=1e-5)
    # p0 backs class 2 strongly: omega * p0 = (0.0665, 0.0090, 0.1958) -> class 2 is kept.
    p0 = torch.tensor([0.1, 0.1, 0.8]).view(1, 3, 1, 1)
    labels, _ = rectify(p0, omega)
    assert labels.item() == 2


def test_rectify_flips_only_when_omega_outweighs_p0() -> None:
    # Pixel A: p0 = (0.6, 0.4): omega * p0 = (0.0107917, 0.3928055) -> label 1 (flipped from p0's argmax),
    #   rectified = (0.0267388, 0.9732612).
    # Pixel B: p0 = (0.99, 0.01): omega * p0 = (0.0178063, 0.0098201) -> label 0 kept, rectified max 0.644539.
    omega = torch.tensor([W0, 1 - W0]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    p0 = torch.tensor([[0.6, 0.99], [0.4, 0.01]]).view(1, 2, 1, 2)
    labels, rect = rectify(p0, omega)
    assert labels.tolist() == [[[1, 0]]]
    assert rect[0, :, 0, 0].tolist() == pytest.approx([0.026738849661063, 0.973261150338937], rel=1e-5)
    assert rect[0, 0, 0, 1].item() == pytest.approx(0.6445390128633531, rel=1e-5)
    assert torch.allclose(rect.sum(1), torch.ones(1, 1, 2))
    # Threshold 0.7: pixel B (max 0.6445) becomes ignore, pixel A (0.9733) stays.
    labels, _ = rectify(p0, omega, conf_threshold=0.7, ignore_index=255)
    assert labels.tolist() == [[[1, 255]]]
    # Invalid pixels and pixels with no supported class (all-zero padded soft label) are ignored too.
    p0_pad = p0.clone()
    p0_pad[..., 1] = 0.0
    labels, rect = rectify(p0_pad, omega, valid=torch.tensor([[[False, True]]]))
    assert labels.tolist() == [[[255, 255]]]
    assert not torch.isnan(rect).any()


def test_class_feature_means_hand_example() -> None:
    # 3x3 map, classes 0/1, one ignored pixel:
    #   labels [[0, 0, 1],      channel 0 [[1, 2, 3],      channel 1 = -channel 0
    #           [0, 0, 1],                 [4, 5, 6],
    #           [0, 255, 0]]               [7, 8, 9]]
    # class 0: pixels 1, 2, 4, 5, 7, 9 -> 28 / 6 = 4.6667 (6 px); class 1: 3, 6 -> 4.5 (2 px); 8 ignored.
    ch0 = torch.arange(1.0, 10.0).view(3, 3)
    feat = torch.stack([ch0, -ch0]).unsqueeze(0)
    labels = torch.tensor([[[0, 0, 1], [0, 0, 1], [0, 255, 0]]])
    means, present = class_feature_sums(feat, labels, num_classes=2, min_pixels=2)
    assert present.tolist() == [[True, True]]
    assert means[0, 0].tolist() == pytest.approx([28 / 6, -28 / 6], rel=1e-6)
    assert means[0, 1].tolist() == pytest.approx([4.5, -4.5], rel=1e-6)
    # min_pixels = 3 drops class 1 (only 2 pixels).
    _, present = class_feature_sums(feat, labels, num_classes=2, min_pixels=3)
    assert present.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="outside"):
        class_feature_sums(feat, torch.full((1, 3, 3), 2), num_classes=2)


def test_accumulator_mean_of_per_image_means() -> None:
    # Image A: 9 pixels of class 0 with feature 1 -> mean 1. Image B: 3 pixels of class 0 with feature 4
    # (rest ignored) -> mean 4. Mean of per-image means = 2.5 (pixel-weighted would be 21/12 = 1.75).
    # Class 1 is never seen (and class 2 only below min_pixels): not initialised, not silently zero-valid.
    acc = PrototypeAccumulator(num_classes=3, feat_dim=1)
    acc.update(torch.ones(1, 1, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long), min_pixels=3)
    lab_b = torch.full((1, 3, 3), 255)
    lab_b[0, 0] = 0
    lab_b[0, 1, 0] = 2  # one pixel of class 2 < min_pixels
    acc.update(torch.full((1, 1, 3, 3), 4.0), lab_b, min_pixels=3)
    bank = acc.finalize()
    assert bank.protos[0].item() == pytest.approx(2.5)
    assert bank.initialized.tolist() == [True, False, False]
    assert bank.protos.dtype == torch.float32


def test_ema_update_hand_value() -> None:
    # lambda = 0.5, D = 1. Start: eta_0 = 2 (initialised), eta_1 not initialised.
    # Image 1 (all class 0, feature 4):           eta_0 = 0.5 * 2 + 0.5 * 4 = 3.
    # Image 2 (top row class 0 = 1, bottom class 1 = 10): eta_0 = 0.5 * 3 + 0.5 * 1 = 2;
    #   eta_1 = 10 (first sight).
    # (Reversed order would give eta_0 = 0.5 * (0.5 * 2 + 0.5 * 1) + 0.5 * 4 = 2.75: order matters.)
    bank = PrototypeBank(2, 1)
    bank.protos[0] = 2.0
    bank.initialized[0] = True
    feat = torch.stack([torch.full((1, 2, 2), 4.0), torch.tensor([[[1.0, 1.0], [10.0, 10.0]]])])
    labels = torch.stack([torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 0], [1, 1]])])
    bank.ema_update(feat, labels, momentum_lambda=0.5, min_pixels=2)
    assert bank.protos[:, 0].tolist() == pytest.approx([2.0, 10.0])
    assert bank.initialized.tolist() == [True, True]


def test_save_load_round_trip_and_class_count_mismatch(tmp_path: Path) -> None:
    bank = PrototypeBank(3, 4)
    bank.protos.copy_(torch.randn(3, 4))
    bank.initialized.copy_(torch.tensor([True, False, True]))
    path = tmp_path / "sub" / "prototypes.pt"
    bank.save(path, ["road", "sidewalk", "building"])
    loaded = PrototypeBank.from_file(path, num_classes=3)
    assert torch.equal(loaded.protos, bank.protos) and torch.equal(loaded.initialized, bank.initialized)
    assert loaded.class_names == ["road", "sidewalk", "building"]
    assert loaded.feat_dim == 4
    with pytest.raises(ValueError, match=r"prototypes\.pt.*3 classes.*expected 19"):
        PrototypeBank.from_file(path, num_classes=19)
    with pytest.raises(ValueError):
        bank.save(path, ["road"])
    # state_dict round trip (checkpoints).
    fresh = PrototypeBank(3, 4)
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.protos, bank.protos) and torch.equal(fresh.initialized, bank.initialized)


# ---------------------------------------------------------------- DDP (gloo, 2 processes)
K, D, LAM, MIN_PX = 3, 4, 0.9, 3


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """7 images: the first 4 are step 1 (2 + 2 per rank), the last 3 step 2 (2 + 1: unequal batches)."""
    g = torch.Generator().manual_seed(123)
    feat = torch.randn(7, D, 4, 4, generator=g)
    labels = torch.randint(0, K, (7, 4, 4), generator=g)
    labels[torch.rand(7, 4, 4, generator=g) < 0.2] = 255
    labels[1] = 2  # class 2 appears first on rank 0's second image: first-sight init mid-batch
    return feat, labels


def _start_bank() -> PrototypeBank:
    bank = PrototypeBank(K, D)
    bank.protos[0] = 1.0
    bank.initialized[0] = True
    return bank


SLICES = {0: ([0, 1], [4, 5]), 1: ([2, 3], [6])}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        feat, labels = _data()
        bank = _start_bank()
        acc = PrototypeAccumulator(K, D)
        for idx in SLICES[rank]:
            bank.ema_update(feat[idx], labels[idx], momentum_lambda=LAM, min_pixels=MIN_PX)
            acc.update(feat[idx], labels[idx], min_pixels=MIN_PX)
        init = acc.finalize()
        torch.save({"ema": bank.state_dict(), "init": init.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_updates_match_single_process(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for part in ("ema", "init"):
        for key in ("protos", "initialized"):
            assert torch.equal(r0[part][key], r1[part][key]), (part, key)

    # Single process over the concatenated batches, in rank order.
    feat, labels = _data()
    bank = _start_bank()
    acc = PrototypeAccumulator(K, D)
    for step in (0, 1):
        idx = SLICES[0][step] + SLICES[1][step]
        bank.ema_update(feat[idx], labels[idx], momentum_lambda=LAM, min_pixels=MIN_PX)
        acc.update(feat[idx], labels[idx], min_pixels=MIN_PX)
    init = acc.finalize()
    assert torch.allclose(r0["ema"]["protos"], bank.protos, atol=1e-6)
    assert torch.equal(r0["ema"]["initialized"], bank.initialized)
    assert bank.initialized.all()
    assert torch.allclose(r0["init"]["protos"], init.protos, atol=1e-6)
    assert torch.equal(r0["init"]["initialized"], init.initialized)
