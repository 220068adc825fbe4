"""Class prototypes of ProDA: distances, weights, initialisation and EMA updates (the rectification of pseudo
labels by prototype weights is a selection rule: :mod:`pipeline.maths.selection`).

Features are the 256-d head features before the last 1x1 conv, ``[B, D, h, w]``; prototypes are ``[K, D]``.
All arithmetic is float32 with autocast disabled, because distances of 256-d features in float16 lose most
of their precision and the prototypes must be identical on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data.ignore import IGNORE_INDEX
from pipeline.distributed import is_dist
from pipeline.files import atomic_path

__all__ = [
    "proto_logits",
    "proto_weights",
    "class_feature_sums",
    "PrototypeBank",
    "PrototypeAccumulator",
]


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def proto_logits(feat: Tensor, protos: Tensor, tau: float = 1.0, valid_protos: Tensor | None = None) -> Tensor:
    """Prototype logits ``-||f - eta_k||_2 / tau``, ``[B, K, h, w]``.

    ``valid_protos`` ([K] bool) marks initialised prototypes. A class without a prototype gets, per pixel, the
    mean logit of the initialised ones: a finite, neutral weight, so rectification (``argmax omega * p0``)
    can still choose it where the soft label supports it (a ``-inf`` logit would ban the class for good,
    and a zero prototype would pretend to be evidence). If no prototype is valid the logits are all zeros
    (a uniform softmax).

    Distances use ``||f||^2 - 2 f.eta + ||eta||^2`` (no ``[B, K, D, h, w]`` difference tensor), clamped at
    1e-12 before the square root so the gradient stays finite when a feature sits on a prototype.
    """
    if feat.dim() != 4 or protos.dim() != 2 or feat.shape[1] != protos.shape[1]:
        raise ValueError(f"expected feat [B,D,h,w] and protos [K,D], got {tuple(feat.shape)} and {tuple(protos.shape)}")
    with _no_autocast(feat.device):
        eta = protos.to(device=feat.device, dtype=torch.float32)
        # Distances are translation invariant: centring on the prototypes' mean shrinks the norms and with
        # them the float32 cancellation error of the expansion below.
        centre = eta.mean(dim=0)
        eta = eta - centre
        f = feat.float() - centre.view(1, -1, 1, 1)
        b, _, h, w = f.shape
        # [K, D] @ [B, D, h*w]: a batched GEMM on f as it lies (NCHW or NHWC), no permuted copies in or out.
        dot = torch.matmul(eta, f.flatten(2)).view(b, -1, h, w)
        sq = (f * f).sum(dim=1, keepdim=True) - 2.0 * dot + (eta * eta).sum(dim=1).view(1, -1, 1, 1)
        logits = -sq.clamp_min(1e-12).sqrt() / tau
        if valid_protos is not None:
            vp = valid_protos.to(device=f.device, dtype=torch.bool).view(1, -1, 1, 1)
            # where() instead of an `if` on .any(): no host-device sync per call; no valid one -> mean 0.
            mean_valid = torch.where(vp, logits, 0.0).sum(dim=1, keepdim=True) / vp.sum().clamp_min(1)
            logits = torch.where(vp, logits, mean_valid)
        return logits


def proto_weights(feat: Tensor, protos: Tensor, tau: float = 1.0, valid_protos: Tensor | None = None) -> Tensor:
    """Prototype weights ``omega = softmax_k(-||f - eta_k|| / tau)``, ``[B, K, h, w]`` (float32)."""
    return F.softmax(proto_logits(feat, protos, tau, valid_protos), dim=1)


def class_feature_sums(
    feat: Tensor,
    labels: Tensor,
    num_classes: int,
    min_pixels: int = 10,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Per image and class, the mean feature over the pixels labelled with that class.

    ``feat`` [B, D, h, w], ``labels`` [B, h, w] at the feature resolution (the caller downsamples, e.g. the
    model's own argmax at stride 8). Returns ``(means [B, K, D] float32, present [B, K] bool)``; a class is
    present in an image only if it has at least ``max(min_pixels, 1)`` pixels (ProDA: 10). Means of absent
    classes are meaningless (0 or a mean over too few pixels) and must be masked with ``present``.
    """
    if feat.dim() != 4 or labels.dim() != 3 or feat.shape[0] != labels.shape[0] or feat.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"expected feat [B,D,h,w] and labels [B,h,w] of the same size, got "
            f"{tuple(feat.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.to(device=feat.device, dtype=torch.long)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels outside 0..{num_classes - 1} that are not ignore_index={ignore_index}")
    with _no_autocast(feat.device):
        f = feat.float().flatten(2)  # [B, D, N]
        # Ignored pixels go to an extra class K that is dropped.
        lab = torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels).flatten(1)
        onehot = F.one_hot(lab, num_classes + 1)[..., :num_classes].to(f.dtype)  # [B, N, K]
        counts = onehot.sum(dim=1)  # [B, K]
        sums = torch.bmm(f, onehot).transpose(1, 2)  # [B, K, D]
        means = sums / counts.clamp_min(1).unsqueeze(-1)
        present = counts >= max(min_pixels, 1)
    return means, present


def _gather(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x`` ([n, ...], n may differ per rank) from all ranks along dim 0, in rank order.

    A no-op without an initialised process group. ``all_gather`` needs equal shapes, so every rank pads to
    the largest ``n`` and the padding is cut off again.
    """
    if not is_dist():
        return x
    world = dist.get_world_size(group)
    n_local = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(sizes, n_local, group=group)
    ns = [int(s.item()) for s in sizes]
    n_max = max(ns)
    if x.shape[0] < n_max:
        x = torch.cat([x, x.new_zeros((n_max - x.shape[0], *x.shape[1:]))], dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, ns, strict=True)], dim=0)


class PrototypeBank(nn.Module):
    """Prototypes ``protos`` [K, D] (float32) and ``initialized`` [K] (bool), kept as module buffers.

    Buffers follow ``.to(device)`` and appear in ``state_dict()`` / ``load_state_dict()``, so a training
    checkpoint can hold the bank next to the model. ``save`` / ``from_file`` write the stand-alone
    stage-1b artefact.
    """

    protos: Tensor
    initialized: Tensor

    def __init__(self, num_classes: int, feat_dim: int, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.register_buffer("protos", torch.zeros(num_classes, feat_dim, dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None

    @property
    def num_classes(self) -> int:
        return self.protos.shape[0]

    @property
    def feat_dim(self) -> int:
        return self.protos.shape[1]

    def save(self, path: str | os.PathLike[str], class_names: Sequence[str]) -> None:
        """Write ``{protos, initialized, class_names, feat_dim}`` with ``torch.save`` (atomically)."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for a bank of {self.num_classes} prototypes")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "protos": self.protos.detach().float().cpu().clone(),
            "initialized": self.initialized.detach().cpu().clone(),
            "class_names": [str(c) for c in class_names],
            "feat_dim": int(self.feat_dim),
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        num_classes: int | None = None,
        map_location: str | torch.device = "cpu",
    ) -> PrototypeBank:
        """Load a bank written by ``save`` (``weights_only=True``).

        If ``num_classes`` is given, the file's class count must match it, else ``ValueError`` naming the file
        and both counts (e.g. a GTA5 bank of 19 classes given to a 16-class SYNTHIA run).
        """
        data = torch.load(path, map_location=map_location, weights_only=True)
        try:
            protos, initialized, names = data["protos"], data["initialized"], list(data["class_names"])
        except (KeyError, TypeError) as exc:
            msg = f"{path}: not a prototype file (needs protos, initialized, class_names)"
            raise ValueError(msg) from exc
        if protos.dim() != 2 or protos.shape[0] != len(names) or initialized.shape != (protos.shape[0],):
            raise ValueError(
                f"{path}: inconsistent prototype file: protos {tuple(protos.shape)}, "
                f"initialized {tuple(initialized.shape)}, {len(names)} class names"
            )
        if num_classes is not None and len(names) != num_classes:
            raise ValueError(f"{path}: prototype file has {len(names)} classes, expected {num_classes}")
        bank = cls(protos.shape[0], protos.shape[1], class_names=names)
        bank.protos.copy_(protos.float())
        bank.initialized.copy_(initialized.bool())
        return bank.to(map_location)

    @torch.no_grad()
    def ema_update(
        self,
        feat: Tensor,
        labels: Tensor,
        momentum_lambda: float,
        min_pixels: int = 10,
        ignore_index: int = IGNORE_INDEX,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        """Stage-1c prototype update: ``eta_k <- lambda * eta_k + (1 - lambda) * mean`` per image and class.

        Images are applied one after the other, in batch order; a class seen for the first time (not
        initialised) takes the mean as is. Under ``torch.distributed`` the per-image means of all ranks are
        gathered and applied in rank order, so every rank ends with identical prototypes, equal to one process
        updating with the concatenated batch. Must then be called by every rank (it is a collective).
        """
        means, present = class_feature_sums(feat.detach(), labels, self.num_classes, min_pixels, ignore_index)
        # One collective: the presence flag rides along as an extra feature column (0.0 / 1.0 exactly).
        packed = torch.cat([means, present.to(means.dtype).unsqueeze(-1)], dim=-1)
        packed = _gather(packed, group).to(self.protos.device)
        means, present = packed[..., :-1], packed[..., -1] > 0.5
        lam = float(momentum_lambda)
        protos, init = self.protos, self.initialized.clone()
        for m, p in zip(means, present, strict=True):
            blended = torch.where(init.unsqueeze(1), lam * protos + (1.0 - lam) * m, m)
            protos = torch.where(p.unsqueeze(1), blended, protos)
            init |= p
        self.protos.copy_(protos)
        self.initialized.copy_(init)


class PrototypeAccumulator:
    """Stage-1b prototype initialisation: running mean of per-image class means over the target set.

    Each image contributes its class mean once (classes with fewer than ``min_pixels`` pixels in that image
    are skipped), exactly the public code's running mean. Sums are kept in float64 so 3k images do not lose
    precision. Under DDP, each rank accumulates its shard and ``all_reduce()`` (called by ``finalize``) sums
    the statistics of all ranks once.
    """

    def __init__(self, num_classes: int, feat_dim: int, device: str | torch.device = "cpu") -> None:
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.sums = torch.zeros(num_classes, feat_dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.long, device=device)
        self._reduced = False

    @torch.no_grad()
    def update(self, feat: Tensor, labels: Tensor, min_pixels: int = 10, ignore_index: int = IGNORE_INDEX) -> None:
        if self._reduced:
            raise RuntimeError("PrototypeAccumulator.update after all_reduce would double count other ranks")
        means, present = class_feature_sums(feat.detach(), labels, self.num_classes, min_pixels, ignore_index)
        means, present = means.to(self.sums.device), present.to(self.sums.device)
        self.sums += torch.where(present.unsqueeze(-1), means, torch.zeros_like(means)).sum(0).double()
        self.counts += present.sum(0)

    def merge(self, other: PrototypeAccumulator) -> None:
        """Add another accumulator's statistics (e.g. a shard processed separately)."""
        if (other.num_classes, other.feat_dim) != (self.num_classes, self.feat_dim):
            raise ValueError("cannot merge accumulators of different shapes")
        self.sums += other.sums.to(self.sums.device)
        self.counts += other.counts.to(self.counts.device)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the statistics of all ranks (once; a no-op without an initialised process group)."""
        if self._reduced:
            return
        if is_dist():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        self._reduced = True

    def finalize(self, class_names: Sequence[str] | None = None) -> PrototypeBank:
        """Reduce across ranks and return the bank; classes never seen are marked not initialised."""
        self.all_reduce()
        bank = PrototypeBank(self.num_classes, self.feat_dim, class_names=class_names)
        seen = self.counts > 0
        mean = self.sums / self.counts.clamp_min(1).unsqueeze(1).double()
        bank.protos.copy_(torch.where(seen.unsqueeze(1), mean, torch.zeros_like(mean)).float().cpu())
        bank.initialized.copy_(seen.cpu())
        return bank
