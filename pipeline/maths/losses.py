"""Loss functions of the ProDA recipe (pure torch, computed in float32).

Conventions shared by every function here:

* ``logits`` are ``[B, K, h, w]``; hard targets are ``[B, H, W]`` long tensors with ``ignore_index`` marking
  pixels without a label. When a hard target is larger than the logits, the logits are upsampled bilinearly
  (``align_corners=False``) to the target size, as the public code does.
* ``valid`` masks are bool tensors broadcastable to ``[B, h, w]``; ``None`` means every pixel counts.
* Every "mean over valid pixels" is ``sum / max(count, 1)``: with no valid pixel the loss is an exact 0 that
  still belongs to the autograd graph (``backward()`` works and gives zero gradients), instead of the NaN that
  ``F.cross_entropy`` returns when all pixels are ignored. This needs no host-device synchronisation.
* Everything is computed in float32 (inputs are cast with ``.float()``), so losses are safe under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.ignore import IGNORE_INDEX
from pipeline.maths.resize import resize_bilinear, resize_bilinear_adjoint

__all__ = [
    "pixel_cross_entropy",
    "cross_entropy",
    "symmetric_ce",
    "structure_kl",
    "entropy_regulariser",
    "kd_kl",
    "lsgan_d_loss",
    "lsgan_g_loss",
    "SOURCE_LABEL",
    "TARGET_LABEL",
]

# LS-GAN domain labels (output-space alignment, AdaptSegNet style): the discriminator is trained to output
# SOURCE_LABEL on source predictions and TARGET_LABEL on target predictions; the segmentation network is
# trained to make target predictions look like source ones (target scored against SOURCE_LABEL).
SOURCE_LABEL = 1.0
TARGET_LABEL = 0.0


def _valid_mask(valid: Tensor | None, b: int, h: int, w: int, device: torch.device) -> Tensor:
    """Broadcast an optional bool mask to ``[B, h, w]``."""
    if valid is None:
        return torch.ones((b, h, w), dtype=torch.bool, device=device)
    if valid.dtype != torch.bool:
        raise TypeError(f"valid mask must be bool, got {valid.dtype}")
    try:
        return torch.broadcast_to(valid.to(device), (b, h, w))
    except RuntimeError as exc:
        msg = f"valid mask of shape {tuple(valid.shape)} does not broadcast to {(b, h, w)}"
        raise ValueError(msg) from exc


def _masked_mean(per_pixel: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``per_pixel`` [B,h,w] over ``valid`` pixels; 0 (graph intact) when none is valid.

    ``torch.where`` (not multiplication) keeps NaN/inf of excluded pixels out of the sum.
    """
    total = torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum()
    return total / valid.sum().clamp_min(1)


def _check_target(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected logits [B,K,h,w] and target [B,H,W], got {tuple(logits.shape)} and {tuple(target.shape)}"
        )


class _PixelCE(torch.autograd.Function):
    """Per-pixel cross entropy of bilinearly resized logits, with a hand-written backward.

    ``F.cross_entropy`` on the resized map allocates and touches several full-size ``[B, K, H, W]`` tensors
    (resized logits, log-probabilities, the NLL's zero-filled gradient, the log-softmax gradient), which at the
    default's sizes costs about half a network forward. Here the resized logits are the only full-size buffer:
    overwritten in place by ``exp(u - max)``, kept for the backward, and overwritten there by the gradient
    ``(softmax - onehot) * grad``, which goes through the resize's adjoint. So a second backward through the
    same graph (retain_graph) is refused.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:  # type: ignore[override]
        in_size = tuple(logits.shape[-2:])
        resized = in_size != tuple(target.shape[-2:])
        # A float32 buffer of our own (resize_bilinear computes in float32 also under autocast; no op below is
        # one autocast lowers): the in-place ops must not touch the caller's logits.
        if resized:
            u = resize_bilinear(logits, target.shape[-2:])
        else:
            u = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        valid = (target != ignore_index).unsqueeze(1)
        y = torch.where(valid, target.unsqueeze(1), 0)
        m = u.amax(dim=1, keepdim=True)
        picked = u.gather(1, y)
        e = u.sub_(m).exp_()
        s = e.sum(dim=1, keepdim=True)
        per = torch.where(valid, s.log() + m - picked, 0.0).squeeze(1)
        ctx.save_for_backward(e, s, y, valid)
        ctx.in_size, ctx.consumed = (in_size if resized else None), False
        return per

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.consumed:  # checked before autograd's own, vaguer version check
            raise RuntimeError(
                "pixel_cross_entropy: a second backward through the same graph (retain_graph=True) is not "
                "supported; its backward overwrites the buffer it saved"
            )
        ctx.consumed = True
        e, s, y, valid = ctx.saved_tensors
        w = torch.where(valid, grad.unsqueeze(1), 0.0)  # d loss / d CE per pixel, 0 where ignored
        g = e.mul_(w / s)  # softmax * w, in the saved buffer
        g.scatter_add_(1, y, -w)  # minus w at the label
        return (g if ctx.in_size is None else resize_bilinear_adjoint(g, ctx.in_size)), None, None


def pixel_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross entropy per pixel ``[B, H, W]`` (0 where the target is ``ignore_index``), of the logits resized
    bilinearly to the target's size; equals ``F.cross_entropy(..., reduction="none")`` of the resized logits
    to float32 rounding, with a leaner backward (:class:`_PixelCE`). Not twice differentiable."""
    _check_target(logits, target)
    return _PixelCE.apply(logits, target.long(), ignore_index)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel-wise cross entropy, mean over pixels whose target is not ``ignore_index``."""
    per = pixel_cross_entropy(logits, target, ignore_index)
    return per.sum() / (target != ignore_index).sum().clamp_min(1)


def symmetric_ce(
    logits: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    ignore_index: int = IGNORE_INDEX,
    log_clamp: float = 1e-4,
) -> Tensor:
    """Symmetric cross entropy (Wang et al., ICCV 2019): ``alpha * CE + beta * RCE``.

    The reverse term swaps prediction and label: ``RCE = -sum_k p_k log q_k`` with ``p`` the softmax and
    ``q`` the one-hot label. ``log 0`` is undefined, so ``q`` is clamped to ``[log_clamp, 1]`` (ProDA and the
    SCE paper use 1e-4): the true class contributes ``log 1 = 0`` and every other class ``log(log_clamp)``,
    i.e. ``RCE = -log(log_clamp) * (1 - p_y)``, a bounded loss that is robust to noisy labels.
    Both terms are averaged over the non-ignored pixels.
    """
    ce = pixel_cross_entropy(logits, target, ignore_index)
    valid = target != ignore_index
    # p_y = softmax(logits)_y = exp(-CE): no second softmax and gather (ignored pixels give CE 0, masked below).
    rce = -math.log(log_clamp) * (1.0 - torch.exp(-ce))
    return _masked_mean(alpha * ce + beta * rce, valid)


def _kl_per_pixel(log_p_teacher: Tensor, log_p_student: Tensor) -> Tensor:
    """``sum_k p_T (log p_T - log p_S)`` per pixel from log-probabilities, with ``0 log 0 = 0``.

    Classes with ``p_T = 0`` (e.g. empty prototypes whose logit is ``-inf``) are dropped with ``torch.where``
    so that ``0 * (-inf - -inf) = NaN`` never enters the sum.
    """
    p_teacher = log_p_teacher.exp()
    terms = p_teacher * (log_p_teacher - log_p_student)
    terms = torch.where(p_teacher > 0, terms, torch.zeros_like(terms))
    return terms.sum(dim=1)


def structure_kl(teacher_logits: Tensor, student_logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Structure-learning loss ``KL(z_T || z_T')`` of ProDA stage 1.

    ``teacher_logits`` (EMA model, weak view, warped into the strong view) and ``student_logits`` (student,
    strong view) are prototype logits ``-||f - eta_k|| / tau`` (see ``prototypes.proto_logits``), both
    ``[B, K, h, w]``. The KL terms are averaged over the ``valid`` pixels (not padded, not cut out, inside the
    warped teacher's support) *and over the K classes*, i.e. the per-pixel KL divided by K: the public code
    averages over an [N, K, H, W] mask, and its weight (10) was tuned for that scale. The teacher is detached.

    Both distributions come from ``log_softmax`` (the public code's structure KL does the same: softmax teacher,
    ``log_softmax`` student; only its KD term passes probabilities). Empty prototypes (``-inf`` logits in both)
    contribute ``0 log 0 = 0``.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)} "
            "logits must have the same shape"
        )
    b, k, h, w = student_logits.shape
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=1)
    log_s = F.log_softmax(student_logits.float(), dim=1)
    return _masked_mean(_kl_per_pixel(log_t, log_s), _valid_mask(valid, b, h, w, student_logits.device)) / k


def entropy_regulariser(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """ProDA's ``reg`` term: ``-mean(log p_t)`` over valid pixels and all classes.

    Minimising it keeps every class probability away from 0 (a KL to the uniform distribution up to a
    constant), which prevents empty clusters / degenerate predictions. Uses ``log_softmax`` for stability.
    """
    b, k, h, w = logits.shape
    log_p = F.log_softmax(logits.float(), dim=1)
    mask = _valid_mask(valid, b, h, w, logits.device)
    # Mean over (pixels x classes) = (mean over pixels of the per-pixel class sum) / K.
    return _masked_mean(-log_p.sum(dim=1), mask) / k


def kd_kl(teacher_probs: Tensor, student_logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Distillation term ``KL(p_teacher || p_student)``, mean over valid pixels and the K classes.

    Mean over classes too (per-pixel KL / K), as the public code's ``[N, K, H, W]`` mask does, so that its
    weight (β = 1) keeps its meaning next to the hard-label CE.

    ``teacher_probs`` are probabilities ``[B, K, H, W]`` (detached); the student's logits are upsampled to
    the teacher's size if needed and turned into log-probabilities with ``log_softmax`` -- the public code
    passed ``softmax`` to ``F.kl_div``, which makes the loss go negative. The result is ``>= 0`` and exactly 0
    when the distributions are equal.
    """
    if teacher_probs.dim() != 4 or student_logits.dim() != 4:
        raise ValueError("teacher_probs and student_logits must be [B,K,h,w]")
    b, k, h, w = teacher_probs.shape
    log_s = F.log_softmax(resize_bilinear(student_logits, (h, w)), dim=1)
    p_t = teacher_probs.detach().float()
    # xlogy gives 0 log 0 = 0; where() drops classes without teacher mass (the student may be -inf there).
    terms = torch.xlogy(p_t, p_t) - p_t * log_s
    terms = torch.where(p_t > 0, terms, torch.zeros_like(terms))
    return _masked_mean(terms.sum(dim=1), _valid_mask(valid, b, h, w, student_logits.device)) / k


def lsgan_d_loss(d_out_real: Tensor, d_out_fake: Tensor) -> Tensor:
    """LS-GAN discriminator loss: ``0.5 * (MSE(D(source), 1) + MSE(D(target), 0))``.

    "Real" is the source domain (``SOURCE_LABEL = 1``), "fake" the target domain (``TARGET_LABEL = 0``);
    the inputs are discriminator outputs on (detached) softmax predictions. The 0.5 matches AdaptSegNet, which
    halves each of the two terms.
    """
    real = d_out_real.float()
    fake = d_out_fake.float()
    return 0.5 * (
        F.mse_loss(real, torch.full_like(real, SOURCE_LABEL)) + F.mse_loss(fake, torch.full_like(fake, TARGET_LABEL))
    )


def lsgan_g_loss(d_out_fake_as_real: Tensor) -> Tensor:
    """LS-GAN adversarial loss of the segmentation net: ``MSE(D(target), SOURCE_LABEL)`` (weight outside)."""
    out = d_out_fake_as_real.float()
    return F.mse_loss(out, torch.full_like(out, SOURCE_LABEL))
