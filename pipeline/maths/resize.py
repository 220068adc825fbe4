"""Bilinear resizing for training losses, as two matrix products.

``resize_bilinear(x, size)`` equals ``F.interpolate(x.float(), size, mode="bilinear", align_corners=False)``
(to float32 rounding): bilinear interpolation is separable, ``out = A_h @ x @ A_w^T`` with fixed interpolation
matrices holding two weights per row. Its backward is two matrix products as well, where the CPU kernel of
``upsample_bilinear2d_backward`` is a serial scatter: several times slower at the default's sizes, about even at
the paper's (bench/bench_adapt_cost.py). Evaluation upsamples without gradient and to much larger sizes, where the dense
products would cost more than the kernel: it keeps ``F.interpolate``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["interp_matrix", "resize_bilinear", "resize_bilinear_adjoint"]


@functools.lru_cache(maxsize=64)
def _matrix(n_in: int, n_out: int, device: torch.device) -> Tensor:
    # PyTorch's source index for align_corners=False (area_pixel_compute_source_index): scale = in/out,
    # src = scale * (dst + 0.5) - 0.5, clamped below at 0; the right neighbour is clamped at the last pixel.
    dst = torch.arange(n_out, dtype=torch.float64)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = src - i0
    rows = torch.arange(n_out)
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    a.index_put_((rows, i1), lam, accumulate=True)
    return a.to(device=device, dtype=torch.float32)


def interp_matrix(n_in: int, n_out: int, device: torch.device | str = "cpu") -> Tensor:
    """``[n_out, n_in]`` float32 matrix of 1-D linear interpolation (``align_corners=False``); cached."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got n_in={n_in}, n_out={n_out}")
    return _matrix(int(n_in), int(n_out), torch.device(device))


def resize_bilinear(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Resize ``x`` ``[B, C, h, w]`` bilinearly to ``size`` (H, W); float32 (also under autocast), contiguous
    ``[B, C, H, W]``."""
    if x.dim() != 4:
        raise ValueError(f"expected [B, C, h, w], got {tuple(x.shape)}")
    x = x.float()
    (h, w), (out_h, out_w) = x.shape[-2:], tuple(size)
    if (h, w) == (out_h, out_w):
        return x
    with torch.autocast(x.device.type, enabled=False):  # float32 also under autocast (no bf16 casts around it)
        return _resize(x, out_h, out_w)


def _resize(x: Tensor, out_h: int, out_w: int) -> Tensor:
    b, c, h, w = x.shape
    # Height first, on the transposed low-resolution map, then width: each pass is one large GEMM over
    # [rows, in] @ [in, out] (a broadcast [H, h] @ [B, C, h, W] would be B*C small batched GEMMs), and the
    # second GEMM writes the full-size result contiguously, so only small maps are ever transposed.
    t = x.transpose(-1, -2).reshape(b * c * w, h)  # [B*C*w, h] (a copy of the small input)
    t = (t @ interp_matrix(h, out_h, x.device).T).view(b, c, w, out_h).transpose(-1, -2)
    t = t.reshape(b * c * out_h, w)  # [B*C*H, w]
    return (t @ interp_matrix(w, out_w, x.device).T).view(b, c, out_h, out_w)


def resize_bilinear_adjoint(grad: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """The adjoint of :func:`resize_bilinear` to ``size`` (h, w): ``A_h^T @ grad @ A_w``, i.e. the gradient of
    the resized map's sum weighted by ``grad`` ``[B, C, H, W]`` with respect to the ``[B, C, h, w]`` input.

    For hand-written backward passes (the fused cross entropy): width first, on the large map's contiguous
    rows, so that only the small intermediate is transposed. Returns a ``[B, C, h, w]`` view, not contiguous.
    """
    b, c, out_h, out_w = grad.shape
    h, w = tuple(size)
    t = grad.reshape(b * c * out_h, out_w) @ interp_matrix(w, out_w, grad.device)  # [B*C*H, w]
    t = t.view(b, c, out_h, w).transpose(-1, -2).reshape(b * c * w, out_h)  # [B*C*w, H] (a small copy)
    return (t @ interp_matrix(h, out_h, grad.device)).view(b, c, w, h).transpose(-1, -2)
