"""Behaviour of the DeepLab-v2 (ProDA head) model, weight loading, EMA, discriminator and lr schedule."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from pipeline.models import (
    Discriminator,
    ModelEMA,
    build_model,
    freeze_batchnorm,
    load_backbone_weights,
    param_groups,
)

torch.set_num_threads(1)

K = 5


def _tiny(backbone: str = "resnet18", **kw) -> nn.Module:
    kw.setdefault("width", 8)
    kw.setdefault("feat_dim", 16)
    kw.setdefault("gn_groups", 4)
    return build_model(backbone, K, **kw)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shapes_and_stride(backbone: str, output_stride: int) -> None:
    torch.manual_seed(0)
    model = _tiny(backbone, output_stride=output_stride).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        logits, feat = model(x)
    side = 64 // output_stride
    assert logits.shape == (1, K, side, side)
    assert feat.shape == (1, 16, side, side)
    assert model.output_stride == output_stride
    assert (model.num_classes, model.feat_dim) == (K, 16)


def test_output_stride_32_and_non_divisible_input() -> None:
    model = _tiny(output_stride=32).eval()
    with torch.no_grad():
        logits, _ = model(torch.rand(1, 3, 64, 96))
    assert logits.shape[-2:] == (2, 3)


def test_dilation_plan_at_stride_8() -> None:
    bb = _tiny("resnet50", output_stride=8).backbone
    # Every 3x3 conv of layer3 is dilated by 2 and of layer4 by 4; no stride after layer2.
    assert {m.dilation for m in bb.layer3.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)} == {(2, 2)}
    assert {m.dilation for m in bb.layer4.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)} == {(4, 4)}
    strides = {m.stride for layer in (bb.layer3, bb.layer4) for m in layer.modules() if isinstance(m, nn.Conv2d)}
    assert strides == {(1, 1)}


def test_width_maps_to_channels() -> None:
    assert _tiny("resnet18", width=16).backbone.out_channels == 128  # 8·width
    assert _tiny("resnet50", width=16).backbone.out_channels == 512  # 8·width·4


def test_head_structure() -> None:
    model = build_model("resnet18", 7, width=8, head_dilations=(2, 3, 5, 7), dropout=0.3, se_reduction=8)
    head = model.head
    assert len(head.branches) == 5
    convs = [b[0] for b in head.branches]
    assert convs[0].kernel_size == (1, 1)
    assert [c.dilation[0] for c in convs[1:]] == [2, 3, 5, 7]
    assert all(c.kernel_size == (3, 3) and c.padding == c.dilation for c in convs[1:])
    assert all(c.out_channels == 256 for c in convs)
    gns = [m for m in head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 6 and all(g.num_groups == 32 for g in gns)
    assert head.se.fc1.in_features == 5 * 256 and head.se.fc1.out_features == 5 * 256 // 8
    fuse = head.bottleneck[0]
    assert (fuse.in_channels, fuse.out_channels, fuse.kernel_size) == (1280, 256, (3, 3))
    assert head.dropout.p == pytest.approx(0.3)
    assert head.classifier.kernel_size == (1, 1)
    assert (head.classifier.in_channels, head.classifier.out_channels) == (256, 7)


def test_gn_groups_fall_back_to_a_divisor() -> None:
    head = build_model("resnet18", K, width=8, feat_dim=48, gn_groups=32).head
    assert {m.num_groups for m in head.modules() if isinstance(m, nn.GroupNorm)} == {16}


def test_features_are_the_classifier_input() -> None:
    model = _tiny().eval()
    with torch.no_grad():
        logits, feat = model(torch.rand(1, 3, 64, 64))
        assert torch.allclose(model.head.classifier(feat), logits, atol=1e-6)


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="resnet101"):
        build_model("vgg16", K)


def test_torchvision_state_dict_loads(tmp_path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("resnet18", K, pretrained=str(path))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)


def test_wrapped_and_prefixed_state_dict_loads(tmp_path) -> None:
    tv = torchvision.models.resnet18()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.encoder.{k}": v for k, v in tv.state_dict().items()}}, path)
    model = _tiny(width=64)
    load_backbone_weights(model, path)
    assert torch.equal(model.backbone.conv1.weight, tv.conv1.weight)


def test_missing_weights_file(tmp_path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="never downloaded") as err:
        load_backbone_weights(_tiny(), path)
    assert str(path) in str(err.value)


def test_shape_mismatch_names_the_key(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="conv1.weight"):
        load_backbone_weights(_tiny(width=8), path)


def test_key_mismatch_lists_keys(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="missing"):
        load_backbone_weights(_tiny("resnet50", width=64), path)


def test_frozen_bn_survives_train() -> None:
    model = _tiny().set_freeze_bn(True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    assert model.head.training
    before = bns[0].running_mean.clone()
    model(torch.rand(1, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
    assert all(p.requires_grad for p in model.head.parameters())


def test_freeze_batchnorm_function() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    freeze_batchnorm(net)
    assert not net[1].training and not net[1].weight.requires_grad and net[0].weight.requires_grad


def test_ema_update_hand_computed() -> None:
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    ema = ModelEMA(net, momentum=0.9)
    assert not ema.module.training and all(not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(3.0)
        net[1].running_mean.fill_(5.0)
    ema.update(nn.DataParallel(net))  # wrapped models are unwrapped
    for p in ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.9 * 1.0 + 0.1 * 3.0))
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 5.0))  # buffers copied, not averaged
    assert net[0].weight.flatten()[0].item() == 3.0  # source untouched

    # The second update reuses the pairs built by the first: it must see in-place writes and .data swaps.
    with torch.no_grad():
        net[0].weight.fill_(5.0)
    net[0].bias.data = torch.full_like(net[0].bias, 7.0)
    ema.update(net)
    assert torch.allclose(ema.module[0].weight, torch.full_like(ema.module[0].weight, 0.9 * 1.2 + 0.1 * 5.0))
    assert torch.allclose(ema.module[0].bias, torch.full_like(ema.module[0].bias, 0.9 * 1.2 + 0.1 * 7.0))

    fresh = ModelEMA(net, momentum=0.9)
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh.module[0].weight, ema.module[0].weight)


def test_ema_update_rejects_a_model_of_another_dtype() -> None:
    net = nn.Sequential(nn.Conv2d(2, 2, 1))
    ema = ModelEMA(net, momentum=0.9)
    with pytest.raises(ValueError, match=r"EMA tensor 0.weight is torch.float32, the model's is torch.float64"):
        ema.update(net.double())


def test_param_groups() -> None:
    model = _tiny().set_freeze_bn(True)
    groups = param_groups(model, lr=2.5e-4, head_lr_mult=10.0, weight_decay=2e-4)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[1]["lr"] / groups[0]["lr"] == pytest.approx(10.0)
    assert all(g["base_lr"] == g["lr"] and g["weight_decay"] == 2e-4 for g in groups)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen and not any(id(p) in frozen for g in groups for p in g["params"])
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_trainable


def test_discriminator_shape() -> None:
    disc = Discriminator(K, ndf=8)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert all(c.stride == (2, 2) and c.kernel_size == (4, 4) for c in convs)
    prob = torch.softmax(torch.randn(2, K, 64, 96), dim=1)
    assert disc(prob).shape == (2, 1, 2, 3)
    assert [c.out_channels for c in Discriminator(19).modules() if isinstance(c, nn.Conv2d)] == [
        64,
        128,
        256,
        512,
        1,
    ]


def test_estimate_bn_stats_is_the_plain_average_over_batches() -> None:
    from pipeline.models import estimate_bn_stats

    bn = torch.nn.BatchNorm2d(1)
    bn.running_mean.fill_(5.0)  # stale statistics (e.g. of the source) are replaced, not blended
    # Batch 1: values {0, 2} -> mean 1, unbiased var 2; batch 2: {4, 4, 10, 10} -> mean 7, unbiased var 12.
    b1 = torch.tensor([0.0, 2.0]).view(2, 1, 1, 1)
    b2 = torch.tensor([4.0, 4.0, 10.0, 10.0]).view(4, 1, 1, 1)
    n = estimate_bn_stats(torch.nn.Sequential(bn), iter([b1, b2]))
    assert n == 6 and not bn.training
    assert bn.running_mean.item() == pytest.approx(4.0)  # (1 + 7) / 2: every batch counts once
    assert bn.running_var.item() == pytest.approx(7.0)  # (2 + 12) / 2
    assert bn.momentum == 0.1  # restored
    with pytest.raises(ValueError, match="no images"):
        estimate_bn_stats(torch.nn.Sequential(bn), iter([]))


def test_source_bn_frozen_normalises_with_the_batch_but_keeps_running_stats() -> None:
    from pipeline.models import source_bn_frozen

    bn = torch.nn.BatchNorm2d(1).train()
    x = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    with source_bn_frozen(bn):
        y = bn(x)
    assert bn.running_mean.item() == 0.0 and bn.running_var.item() == 1.0
    assert y.flatten().tolist() == pytest.approx([-1.0, 1.0], abs=1e-3)  # batch statistics were used
    bn(x)  # outside the context the running statistics move again
    assert bn.running_mean.item() == pytest.approx(0.2)
