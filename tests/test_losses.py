"""Hand-checked values for pipeline.maths.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.maths.losses import (
    cross_entropy,
    entropy_regulariser,
    kd_kl,
    lsgan_d_loss,
    lsgan_g_loss,
    pixel_cross_entropy,
    structure_kl,
    symmetric_ce,
)


def _pix(*values: float) -> torch.Tensor:
    """One pixel of logits, shape [1, K, 1, 1]."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


# ---------------------------------------------------------------- cross entropy
def test_cross_entropy_ignores_pixels() -> None:
    # Pixel 0: logits [0, ln 3] -> p = [1/4, 3/4], label 1 -> -log(3/4). Pixel 1 is ignored: its logits
    # (which would give a huge loss) must not count, and the mean is over 1 pixel.
    logits = torch.tensor([[0.0, 50.0], [math.log(3.0), -50.0]]).view(1, 2, 1, 2)
    target = torch.tensor([[[1, 255]]])
    assert cross_entropy(logits, target).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_graph() -> None:
    logits = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = cross_entropy(logits, torch.full((2, 2, 2), 255))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_cross_entropy_upsamples_logits_to_target() -> None:
    logits = torch.randn(1, 3, 2, 2)
    target = torch.randint(0, 3, (1, 4, 4))
    up = F.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=False)
    assert cross_entropy(logits, target).item() == pytest.approx(F.cross_entropy(up, target).item(), rel=1e-6)


@pytest.mark.parametrize(("src", "dst"), [((12, 24), (96, 192)), ((6, 6), (6, 6)), ((5, 7), (9, 4))])
@pytest.mark.parametrize("amp", [False, True])
def test_pixel_cross_entropy_equals_torch_values_and_grads(src, dst, amp: bool) -> None:
    # The hand-written forward/backward against F.cross_entropy on F.interpolate'd logits (float32 reference
    # on the same, possibly bf16-rounded, logits), with ignored pixels and an arbitrary upstream gradient.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *src, generator=gen) * 4
    x = (x.bfloat16() if amp else x).contiguous(memory_format=torch.channels_last).requires_grad_()
    target = torch.randint(0, 5, (2, *dst), generator=gen)
    target[0, :2] = 255
    upstream = torch.rand(2, *dst, generator=gen)
    ref_in = x.detach().float().requires_grad_()
    up = F.interpolate(ref_in, size=dst, mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, target, ignore_index=255, reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        per = pixel_cross_entropy(x, target)
    assert per.dtype == torch.float32 and per.shape == target.shape
    assert torch.all(per[0, :2] == 0)
    torch.testing.assert_close(per, ref, atol=2e-5, rtol=1e-5)
    (per * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert x.grad.dtype == x.dtype
    torch.testing.assert_close(x.grad.float(), ref_in.grad, atol=1e-2 if amp else 2e-5, rtol=1e-2 if amp else 1e-5)


def test_pixel_cross_entropy_hand_value_and_gradient() -> None:
    # logits [0, ln 3], label 1: CE = -log(3/4); dCE/dz = softmax - onehot = [1/4, -1/4].
    z = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).requires_grad_()
    per = pixel_cross_entropy(z, torch.tensor([[[1]]]))
    assert per.item() == pytest.approx(-math.log(0.75), rel=1e-6)
    per.sum().backward()
    torch.testing.assert_close(z.grad.view(-1), torch.tensor([0.25, -0.25]))


def test_pixel_cross_entropy_refuses_a_second_backward() -> None:
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = cross_entropy(z, torch.randint(0, 3, (1, 4, 4)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()


# ---------------------------------------------------------------- symmetric CE
def test_symmetric_ce_hand_value() -> None:
    # logits [2, 0, -1], y = 0: p = [0.843795, 0.114195, 0.042010].
    # CE = -log 0.843795 = 0.169846;
    # RCE = -(0.114195 + 0.042010) * log(1e-4) = 0.156205 * 9.210340 = 1.438704.
    # alpha=0.1, beta=1: 0.1 * 0.169846 + 1.438704 = 1.455688.
    # A second, ignored pixel must not change the mean.
    logits = torch.cat([_pix(2.0, 0.0, -1.0), _pix(-9.0, 9.0, 0.0)], dim=3)
    target = torch.tensor([[[0, 255]]])
    loss = symmetric_ce(logits, target, alpha=0.1, beta=1.0)
    assert loss.item() == pytest.approx(1.4556882652774066, rel=1e-5)


def test_symmetric_ce_log_clamp_and_all_ignored() -> None:
    # With log_clamp = e^-1 the reverse term is (1 - p_y) * 1; p_y = 1/2 for equal logits.
    loss = symmetric_ce(_pix(0.0, 0.0), torch.tensor([[[1]]]), alpha=0.0, beta=1.0, log_clamp=math.exp(-1))
    assert loss.item() == pytest.approx(0.5, rel=1e-6)
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss = symmetric_ce(logits, torch.full((1, 2, 2), 255), 0.1, 1.0)
    loss.backward()
    assert loss.item() == 0.0


# ---------------------------------------------------------------- structure KL
def test_structure_kl_zero_when_equal() -> None:
    z = torch.randn(2, 4, 3, 3)
    loss = structure_kl(z, z.clone(), torch.ones(2, 3, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(0, abs=1e-6)


def test_structure_kl_hand_value_and_detached_teacher() -> None:
    # Teacher logits [0, ln 3] -> p_T = [1/4, 3/4]; student [0, 0] -> p_S = [1/2, 1/2].
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.173287 + 0.304099 = 0.130812, averaged over K = 2 classes: 0.065406.
    teacher = _pix(0.0, math.log(3.0)).requires_grad_(True)
    student = _pix(0.0, 0.0).requires_grad_(True)
    loss = structure_kl(teacher, student, torch.ones(1, 1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.13081203594113697 / 2, rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_structure_kl_masked_pixels_excluded() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    valid = torch.rand(2, 4, 4) > 0.5
    base = structure_kl(t, s, valid)
    t2, s2 = t.clone(), s.clone()
    t2[~valid.unsqueeze(1).expand_as(t2)] = 30.0  # change only masked pixels, also to non-finite values
    s2[:, 0][~valid] = float("nan")
    assert structure_kl(t2, s2, valid).item() == pytest.approx(base.item(), rel=1e-6)
    # Mean over valid pixels (not over all pixels) and over the K = 3 classes, as the public [N,K,H,W] mask.
    per_pixel = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)
    assert base.item() == pytest.approx(per_pixel[valid].mean().item() / 3, rel=1e-5)
    public = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="none")
    mask = valid.unsqueeze(1).expand_as(public).float()
    assert base.item() == pytest.approx(((public * mask).sum() / mask.sum()).item(), rel=1e-5)


def test_structure_kl_neg_inf_logits_no_nan() -> None:
    # Class 2 is an empty prototype: -inf in both teacher and student (0 log 0 = 0, no NaN, finite grads).
    t = torch.tensor([0.0, math.log(3.0), float("-inf")]).view(1, 3, 1, 1)
    s = torch.tensor([0.0, 0.0, float("-inf")]).view(1, 3, 1, 1).requires_grad_(True)
    loss = structure_kl(t, s)
    assert loss.item() == pytest.approx(0.13081203594113697 / 3, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- entropy regulariser
def test_entropy_regulariser_hand_value() -> None:
    # logits [0, ln 3] -> p = [1/4, 3/4]: -(ln 1/4 + ln 3/4) / 2 = (1.386294 + 0.287682) / 2 = 0.836988.
    # The second pixel is masked out.
    logits = torch.cat([_pix(0.0, math.log(3.0)), _pix(20.0, -20.0)], dim=3)
    valid = torch.tensor([[[True, False]]])
    assert entropy_regulariser(logits, valid).item() == pytest.approx(0.8369882167858358, rel=1e-5)
    # Uniform prediction over K classes gives log K.
    assert entropy_regulariser(torch.zeros(1, 5, 2, 2)).item() == pytest.approx(math.log(5), rel=1e-6)


# ---------------------------------------------------------------- KD KL
def test_kd_kl_nonnegative_zero_when_equal_and_public_bug() -> None:
    torch.manual_seed(0)
    for _ in range(5):
        teacher = F.softmax(torch.randn(2, 4, 3, 3) * 3, dim=1)
        student = torch.randn(2, 4, 3, 3) * 3
        assert kd_kl(teacher, student).item() >= 0.0
    logits = torch.randn(2, 4, 3, 3)
    assert kd_kl(F.softmax(logits, 1), logits).item() == pytest.approx(0.0, abs=1e-6)

    # The public code passed probabilities where kl_div needs log-probabilities: sum t(log t - s) can be < 0.
    # E.g. teacher uniform over 2 classes: -log 2 - (s_0 + s_1)/2 = -0.693 - 0.5 < 0 whatever the student.
    teacher = torch.full((1, 2, 1, 1), 0.5)
    student = _pix(1.0, -1.0)
    public = F.kl_div(F.softmax(student, dim=1), teacher, reduction="sum")
    assert public.item() == pytest.approx(-math.log(2) - 0.5, rel=1e-5)
    assert public.item() < 0 <= kd_kl(teacher, student).item()


def test_kd_kl_valid_mask_and_zero_teacher_mass() -> None:
    # Teacher mass 0 on class 1: 0 log 0 = 0 even where the student is -inf; masked pixel excluded.
    teacher = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).view(1, 2, 1, 2)
    student = torch.tensor([[0.0, 9.0], [float("-inf"), -9.0]]).view(1, 2, 1, 2)
    loss = kd_kl(teacher, student, torch.tensor([[[True, False]]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_kd_kl_hand_value_mean_over_classes() -> None:
    # Teacher [1/4, 3/4], student logits [0, 0] -> p_S = [1/2, 1/2]: KL = 0.130812 per pixel, / K=2 = 0.065406.
    teacher = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)
    assert kd_kl(teacher, _pix(0.0, 0.0)).item() == pytest.approx(0.13081203594113697 / 2, rel=1e-5)


# ---------------------------------------------------------------- LS-GAN
def test_lsgan_losses() -> None:
    # D: 0.5 * (mean (real - 1)^2 + mean fake^2) = 0.5 * (0.25 + 0.04) = 0.145; G: mean (fake - 1)^2 = 0.64.
    real, fake = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 0.2)
    assert lsgan_d_loss(real, fake).item() == pytest.approx(0.145, rel=1e-6)
    assert lsgan_g_loss(fake).item() == pytest.approx(0.64, rel=1e-6)
    assert lsgan_d_loss(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)).item() == 0.0
