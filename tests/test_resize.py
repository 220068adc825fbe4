"""pipeline.maths.resize: bilinear resizing as matrix products equals F.interpolate, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.maths.resize import interp_matrix, resize_bilinear, resize_bilinear_adjoint


def test_interp_matrix_hand_values() -> None:
    # 2 -> 4, align_corners=False: source positions (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25
    # (right neighbour clamped to the last pixel).
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    assert torch.equal(interp_matrix(2, 4), expected)
    # 4 -> 2: positions 0.5 and 2.5, each the mean of two neighbours.
    assert torch.equal(interp_matrix(4, 2), torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]))
    # Every row is a convex combination.
    assert torch.allclose(interp_matrix(13, 97).sum(1), torch.ones(97))


@pytest.mark.parametrize(
    ("src", "dst"),
    [((12, 24), (96, 192)), ((12, 24), (24, 48)), ((16, 32), (24, 48)), ((96, 192), (12, 24)), ((7, 5), (13, 3))],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_resize_equals_interpolate_values_and_grads(src, dst, channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *src, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, *dst, generator=gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = resize_bilinear(a, dst)
    ref = F.interpolate(b, size=dst, mode="bilinear", align_corners=False)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, atol=5e-5, rtol=1e-5)


def test_resize_casts_to_float_and_keeps_same_size() -> None:
    x = torch.randn(1, 2, 3, 4).bfloat16()
    out = resize_bilinear(x, (3, 4))
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    with pytest.raises(ValueError, match=r"expected \[B, C, h, w\]"):
        resize_bilinear(torch.randn(2, 3, 4), (6, 8))
    with pytest.raises(ValueError, match="sizes must be positive"):
        interp_matrix(0, 3)


@pytest.mark.parametrize(("src", "dst"), [((12, 24), (96, 192)), ((7, 5), (13, 3))])
def test_adjoint_is_the_gradient_of_resize(src, dst) -> None:
    # <resize(x), g> = <x, adjoint(g)> for all x, g: the adjoint is resize's gradient.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *src, generator=gen, requires_grad=True)
    g = torch.randn(2, 3, *dst, generator=gen)
    resize_bilinear(x, dst).backward(g)
    adj = resize_bilinear_adjoint(g, src)
    assert adj.shape == x.shape
    torch.testing.assert_close(adj, x.grad, atol=1e-5, rtol=1e-5)


def test_resize_is_float32_under_autocast() -> None:
    x = torch.randn(1, 2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = resize_bilinear(x.bfloat16(), (6, 8))
    ref = F.interpolate(x.bfloat16().float(), size=(6, 8), mode="bilinear", align_corners=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
