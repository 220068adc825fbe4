"""DeepLab-v2 as used by ProDA: dilated ResNet backbone + ProDA's GroupNorm/SE head, plus training helpers.

Also holds the EMA (momentum) encoder, the AdaptSegNet output-space discriminator, optimizer parameter groups
and the poly learning-rate schedule.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from pipeline.distributed import unwrap

__all__ = [
    "BACKBONES",
    "BasicBlock",
    "Discriminator",
    "ModelEMA",
    "ProDAHead",
    "ResNetBackbone",
    "SEBlock",
    "SegModel",
    "build_backbone",
    "build_model",
    "freeze_batchnorm",
    "load_backbone_weights",
    "param_groups",
]

# name -> (block, blocks per stage), as in torchvision.
BACKBONES: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {}


# --------------------------------------------------------------------------------------------- backbone
class BasicBlock(nn.Module):
    """ResNet basic block with torchvision's parameter names; unlike torchvision's, it accepts dilation."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


BACKBONES.update(
    {
        "resnet18": (BasicBlock, (2, 2, 2, 2)),
        "resnet34": (BasicBlock, (3, 4, 6, 3)),
        "resnet50": (Bottleneck, (3, 4, 6, 3)),
        "resnet101": (Bottleneck, (3, 4, 23, 3)),
    }
)

# output stride -> (stride, dilation) of layer3 and layer4; the first two stages always reduce by 8.
_STRIDE_PLAN = {8: ((1, 2), (1, 4)), 16: ((2, 1), (1, 2)), 32: ((2, 1), (2, 1))}


class ResNetBackbone(nn.Module):
    """Dilated ResNet (no avgpool/fc). Stage widths are width·(1, 2, 4, 8) (× 4 for Bottleneck).

    Module names follow torchvision so its ResNet state dicts load with strict keys (fc.* aside).
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        width: int = 64,
        output_stride: int = 8,
    ) -> None:
        super().__init__()
        if output_stride not in _STRIDE_PLAN:
            raise ValueError(f"output_stride must be one of {sorted(_STRIDE_PLAN)}, got {output_stride}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.output_stride = output_stride
        self.width = width
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # floor-mode pooling (torchvision) rather than DeepLab's ceil_mode, so outputs are exactly H/os.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        (s3, d3), (s4, d4) = _STRIDE_PLAN[output_stride]
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=s3, dilation=d3)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=s4, dilation=d4)
        self.out_channels = self.inplanes

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1, dilation: int = 1
    ) -> nn.Sequential:
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        # DeepLab-v2 dilates every block of a stage, the first one included (torchvision keeps the previous
        # dilation there); weights are shape-identical either way.
        mods = [block(self.inplanes, planes, stride, downsample, dilation=dilation)]
        self.inplanes = planes * expansion
        mods += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def build_backbone(name: str, width: int = 64, output_stride: int = 8) -> ResNetBackbone:
    """Dilated ResNet-18/34/50/101 by name."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(sorted(BACKBONES))}")
    block, layers = BACKBONES[name]
    return ResNetBackbone(block, layers, width=width, output_stride=output_stride)


# ------------------------------------------------------------------------------------------------- head
class SEBlock(nn.Module):
    """Squeeze-excitation: channel gates from global average pooling, as in ProDA's head."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.adaptive_avg_pool2d(x, 1).flatten(1)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w[:, :, None, None]


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    # Largest group count <= `groups` that divides `channels`, so tiny test heads still build.
    return nn.GroupNorm(math.gcd(min(groups, channels), channels), channels)


class ProDAHead(nn.Module):
    """ProDA's DeepLab-v2 head (public code's ``Classifier_Module2``).

    Five parallel branches (1x1 conv and 3x3 convs at ``dilations``), each conv → GroupNorm → ReLU to
    ``feat_dim`` channels, are concatenated, gated by squeeze-excitation, fused by a 3x3 conv → GroupNorm
    (→ ReLU only if ``feat_relu``), then Dropout2d and a bias-free 1x1 classifier. ``forward`` returns
    ``(logits, features)``; the features are the fused tensor before dropout (the prototype space).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        feat_dim: int = 256,
        dilations: Sequence[int] = (6, 12, 18, 24),
        dropout: float = 0.1,
        gn_groups: int = 32,
        se_reduction: int = 16,
        feat_relu: bool = False,
    ) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        branches = [nn.Sequential(nn.Conv2d(in_channels, feat_dim, 1), _gn(feat_dim, gn_groups), nn.ReLU(True))]
        for d in self.dilations:
            conv = nn.Conv2d(in_channels, feat_dim, 3, padding=d, dilation=d)
            branches.append(nn.Sequential(conv, _gn(feat_dim, gn_groups), nn.ReLU(True)))
        self.branches = nn.ModuleList(branches)
        cat_dim = feat_dim * len(branches)
        self.se = SEBlock(cat_dim, se_reduction)
        fuse: list[nn.Module] = [nn.Conv2d(cat_dim, feat_dim, 3, padding=1), _gn(feat_dim, gn_groups)]
        if feat_relu:
            fuse.append(nn.ReLU(True))
        self.bottleneck = nn.Sequential(*fuse)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # The public code's intended init (its loop over the branches never matched a Conv2d).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Tiny classifier weights: near-uniform initial predictions, as in the public code.
        nn.init.normal_(self.classifier.weight, 0.0, 0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.cat([b(x) for b in self.branches], dim=1)
        feat = self.bottleneck(self.se(out))
        return self.classifier(self.dropout(feat)), feat


# ------------------------------------------------------------------------------------------------ model
def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``module`` (wrappers such as DDP included)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Put every BatchNorm layer in eval mode and stop gradients to its affine params (BN frozen).

    ``module.train()`` undoes the eval mode; a SegModel whose ``freeze_bn`` is set re-applies this in train().
    """
    for m in batchnorms(module):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return module


class SegModel(nn.Module):
    """Backbone + ProDA head. ``forward(x)`` takes RGB/255 (no mean/std) and returns ``(logits, features)``,
    both at the backbone's output stride (callers upsample)."""

    def __init__(self, backbone: ResNetBackbone, head: ProDAHead, bn_clr: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        # The public SimCLR student's extra BatchNorm on the backbone output (its ``bn_clr``).
        self.bn_clr = nn.BatchNorm2d(backbone.out_channels) if bn_clr else None
        self.head = head
        self.num_classes: int = head.classifier.out_channels
        self.feat_dim: int = head.classifier.in_channels
        self.output_stride: int = backbone.output_stride
        self.freeze_bn = False

    def set_freeze_bn(self, freeze: bool) -> SegModel:
        """The training stage's BatchNorm policy: frozen (eval mode, fixed affine params, kept so by train()) or
        trained. A policy of the stage that trains the model, not of its architecture: the public recipe
        freezes BatchNorm in the warm-up only."""
        self.freeze_bn = freeze
        for m in batchnorms(self):
            for p in m.parameters():
                p.requires_grad_(not freeze)
        return self.train(self.training)

    def train(self, mode: bool = True) -> SegModel:
        super().train(mode)
        # Frozen BN must keep its running statistics even while the rest trains.
        if self.freeze_bn:
            freeze_batchnorm(self)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.backbone(x)
        return self.head(x if self.bn_clr is None else self.bn_clr(x))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters()
        if self.bn_clr is not None:
            yield from self.bn_clr.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()


def build_model(
    backbone: str,
    num_classes: int,
    *,
    width: int = 64,
    output_stride: int = 8,
    feat_dim: int = 256,
    head_dilations: Sequence[int] = (6, 12, 18, 24),
    dropout: float = 0.1,
    gn_groups: int = 32,
    se_reduction: int = 16,
    feat_relu: bool = False,
    pretrained: str | Path | None = None,
    bn_clr: bool = False,
) -> SegModel:
    """Build a DeepLab-v2 (ProDA head) model; ``pretrained`` is a local torchvision-format ResNet file."""
    bb = build_backbone(backbone, width=width, output_stride=output_stride)
    head = ProDAHead(
        bb.out_channels,
        num_classes,
        feat_dim=feat_dim,
        dilations=head_dilations,
        dropout=dropout,
        gn_groups=gn_groups,
        se_reduction=se_reduction,
        feat_relu=feat_relu,
    )
    model = SegModel(bb, head, bn_clr=bn_clr)
    if pretrained is not None:
        load_backbone_weights(model, pretrained)
    return model


_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "backbone.", "encoder.")


def load_backbone_weights(model: SegModel, path: str | Path) -> None:
    """Load a local torchvision-format ResNet state dict into ``model.backbone`` (fc.* ignored).

    Accepts a checkpoint that wraps it under "state_dict"/"model" and keys prefixed by "module.",
    "backbone." or "encoder." (e.g. a converted SimCLRv2 ResNet). Never downloads anything.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights not found at {path}; weights are never downloaded: place a torchvision-format "
            "ResNet state dict there"
        )
    obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")

    sd: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        changed = True
        while changed:  # prefixes can stack, e.g. "module.encoder."
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        if not k.startswith("fc."):
            sd[k] = v

    target = model.backbone.state_dict()
    # Old torchvision files predate BN's num_batches_tracked buffer; BN's loader fills it in.
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {type(model.backbone).__name__} keys: {len(missing)} missing "
            f"(e.g. {missing[:5]}), {len(unexpected)} unexpected (e.g. {unexpected[:5]})"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ValueError(
                f"{path}: shape mismatch for {k!r}: file {tuple(v.shape)} vs model {tuple(target[k].shape)} "
                f"(pretrained weights need width=64)"
            )
    model.backbone.load_state_dict(sd, strict=True)


# -------------------------------------------------------------------------------------------------- EMA
class source_bn_frozen:
    """Context: BatchNorm layers normalise with the batch's statistics but leave their running ones alone.

    Used for source forwards during adaptation, so the running statistics, which evaluation and inference
    use, follow the target domain only (domain-specific normalisation; a source + target mixture fits
    neither).
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.bns = batchnorms(model) if enabled else []
        self.saved: list[float | None] = []

    def __enter__(self) -> source_bn_frozen:
        self.saved = [m.momentum for m in self.bns]
        for m in self.bns:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
        return self

    def __exit__(self, *exc: object) -> None:
        for m, mom in zip(self.bns, self.saved, strict=True):
            m.momentum = mom


@torch.no_grad()
def estimate_bn_stats(model: nn.Module, batches: Iterator[torch.Tensor]) -> int:
    """Re-estimates every BatchNorm's running mean/var as the plain average over ``batches`` (AdaBN).

    ``batches`` yields float images [B, 3, H, W]; no labels, no parameter changes. Returns the images seen.
    The model is left in eval mode.
    """
    bns = batchnorms(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    for m in bns:
        m.train()  # also under freeze_bn, whose train() keeps BatchNorm in eval mode
    n = 0
    try:
        for x in batches:
            model(x)
            n += x.shape[0]
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.eval()
    if n == 0:
        raise ValueError("estimate_bn_stats: no images")
    return n


class ModelEMA:
    """Momentum (mean-teacher) copy of a model: ema = m·ema + (1−m)·param; buffers (BN stats) are copied."""

    def __init__(self, model: nn.Module, momentum: float) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(unwrap(model))
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs: tuple | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        if self._pairs is None or self._pairs[0] is not src:
            self._pairs = (src, *self._match(src))
        _, ema, cur, ema_buf, cur_buf, ints = self._pairs
        # One multi-tensor op instead of two small ops per tensor: ema + (1 − m)(p − ema) = m·ema + (1 − m)·p.
        if ema:
            torch._foreach_lerp_(ema, cur, 1.0 - self.momentum)
        if ema_buf:
            torch._foreach_copy_(ema_buf, cur_buf)
        for e, p in ints:
            e.copy_(p)

    def _match(self, src: nn.Module) -> tuple[list, list, list, list, list]:
        """The EMA's tensors paired by name with ``src``'s, built once per source module (walking both modules'
        names every step doubled the update's cost on the default model). Parameters are kept as
        objects, so in-place loads and ``.data`` swaps stay visible."""
        params = dict(src.named_parameters())
        ema, cur, ints = [], [], []
        for name, e in self.module.named_parameters():
            p = params[name]
            if p.dtype != e.dtype:
                raise ValueError(f"EMA tensor {name} is {e.dtype}, the model's is {p.dtype}")
            if e.dtype.is_floating_point:
                ema.append(e)
                cur.append(p)
            else:
                ints.append((e, p))
        buffers = dict(src.named_buffers())
        ema_buf, cur_buf = [], []
        for name, b in self.module.named_buffers():
            ema_buf.append(b)
            cur_buf.append(buffers[name])
        return ema, cur, ema_buf, cur_buf, ints

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA network's own state dict, loadable into a plain SegModel."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------- discriminator
class Discriminator(nn.Module):
    """AdaptSegNet output-space discriminator on softmax maps: four 4x4 stride-2 convs (ndf..8·ndf) with
    LeakyReLU(0.2), then a 4x4 stride-2 conv to one channel. Output is input/32 (input ≥ 32 px per side)."""

    def __init__(self, num_classes: int, ndf: int = 64) -> None:
        super().__init__()
        chans = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(chans[-1], 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, prob: torch.Tensor) -> torch.Tensor:
        return self.net(prob)


# ------------------------------------------------------------------------------------ optimisation utils
def param_groups(model: SegModel, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict[str, Any]]:
    """SGD groups: backbone at ``lr``, head at ``lr·head_lr_mult``; frozen params and empty groups skipped.

    Each group records "base_lr" so the engine's poly schedule can scale from it.
    """
    model = unwrap(model)  # type: ignore[assignment]
    groups = []
    for name, params, group_lr in (
        ("backbone", model.backbone_parameters(), lr),
        ("head", model.head_parameters(), lr * head_lr_mult),
    ):
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append(
                {
                    "name": name,
                    "params": trainable,
                    "lr": group_lr,
                    "base_lr": group_lr,
                    "weight_decay": weight_decay,
                }
            )
    return groups
