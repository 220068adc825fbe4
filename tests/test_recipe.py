"""The public recipe's knobs: BatchNorm policy per stage, SyncBatchNorm under DDP on CUDA, the KD student per
round (SimCLR student with its extra BatchNorm), the EMA model's mode, views drawn from a larger image than
inference reads, and a poly schedule that ends above lr 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn

from pipeline.config import parse_params
from pipeline.data.labels import class_names
from pipeline.data.views import WeakViewConfig, make_weak_view
from pipeline.distributed import DistInfo
from pipeline.engine.context import Context, model_params, new_model, save_model
from pipeline.engine.loop import poly_factor
from pipeline.engine.training import sync_batchnorm
from pipeline.maths.prototypes import PrototypeBank
from pipeline.methods.distill import student
from pipeline.methods.proda import ProDATask
from pipeline.models import batchnorms
from tests.tiny import tiny_params

K = 19
REPO = Path(__file__).resolve().parents[1]


def _ctx(world: int = 1, device: str = "cpu", sync_bn: bool = True) -> Context:
    info = DistInfo(
        rank=0, world_size=world, local_rank=0, device=torch.device(device, 0 if device == "cuda" else None)
    )
    return Context("distill@1", 0, info, class_names(K), sync_bn=sync_bn)


def _params(**overrides):
    return parse_params(tiny_params(**overrides))


# ---------------------------------------------------------------------------------------- BatchNorm policy
def test_freeze_bn_is_a_policy_a_stage_sets_and_undoes() -> None:
    model = new_model(_params().model, K).set_freeze_bn(True).train()
    bns = batchnorms(model)
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in bns)
    model.set_freeze_bn(False)  # the next stage trains BatchNorm (the public stage 1 and KD rounds)
    assert all(m.training and all(p.requires_grad for p in m.parameters()) for m in bns)


def test_the_presets_freeze_bn_in_the_warm_up_only() -> None:
    for path in sorted((REPO / "params").glob("*.yaml")):
        p = parse_params(yaml.safe_load(path.read_text()))
        assert (p.warmup.freeze_bn, p.adapt.freeze_bn, p.distill.freeze_bn) == (True, False, False), path.name


# ------------------------------------------------------------------------------------------ SyncBatchNorm
def test_sync_batchnorm_where_bn_trains_under_ddp_on_cuda_only() -> None:
    def converted(ctx: Context, freeze: bool = False) -> bool:
        model = new_model(_params().model, K).set_freeze_bn(freeze)
        return any(isinstance(m, nn.SyncBatchNorm) for m in sync_batchnorm(model, ctx).modules())

    assert converted(_ctx(world=2, device="cuda"))  # layers replaced; no CUDA needed to build them
    assert not converted(_ctx(world=2, device="cuda"), freeze=True)  # frozen BN has nothing to synchronise
    assert not converted(_ctx(world=2, device="cpu"))  # gloo: each process keeps its own statistics
    assert not converted(_ctx(world=1, device="cuda"))
    assert not converted(_ctx(world=2, device="cuda", sync_bn=False))
    model = new_model(_params().model, K)
    keys = list(model.state_dict())
    assert list(sync_batchnorm(model, _ctx(world=2, device="cuda")).state_dict()) == keys  # same model files


# ------------------------------------------------------------------------------------ KD student per round
@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    params = _params()
    torch.manual_seed(3)
    model = new_model(params.model, K)
    path = tmp_path / "teacher.pt"
    save_model(path, model, _ctx(), params.model, None)
    return path


def _simclr_file(tmp_path: Path, mp) -> tuple[Path, dict]:
    """A SimCLRv2-style checkpoint as the converter accepts it: the ResNet under "state_dict", keys prefixed."""
    torch.manual_seed(7)
    backbone = new_model(mp, K).backbone.state_dict()
    path = tmp_path / "simclr.pth"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in backbone.items()}}, path)
    return path, backbone


def test_round_students_follow_their_own_student_init(tmp_path: Path, teacher: Path) -> None:
    weights, backbone = _simclr_file(tmp_path, _params().model)
    rounds = {
        "1": {"teacher": "models/adapt", "student_init": "pretrained"},
        "2": {"teacher": "models/distill_1", "student_init": "previous"},
    }
    p = _params(
        **{"distill.rounds": rounds, "distill.student_weights": str(weights), "distill.student_bn_clr": True}
    ).distill
    ctx = _ctx()
    # Round 1 (the public stage 2): the SimCLR backbone, plus the extra BatchNorm on its output.
    s1, mp1 = student(ctx, p, 1, teacher)
    assert mp1.bn_clr and isinstance(s1.bn_clr, nn.BatchNorm2d)
    assert all(torch.equal(s1.backbone.state_dict()[k], v) for k, v in backbone.items())
    # Round 2 (the public stage 3 restores the stage-2 model): the teacher's weights and architecture.
    path2 = tmp_path / "round1.pt"
    save_model(path2, s1, ctx, mp1, None)
    s2, mp2 = student(ctx, p, 2, path2)
    assert mp2.bn_clr and model_params(torch.load(path2, weights_only=False)["meta"]).bn_clr
    assert all(torch.equal(a, b) for a, b in zip(s2.state_dict().values(), s1.state_dict().values(), strict=True))


def test_bn_clr_normalises_the_backbone_output() -> None:
    mp = _params().model.model_copy(update={"bn_clr": True})
    model = new_model(mp, K).eval()
    seen: list[torch.Tensor] = []
    model.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model.bn_clr.running_mean.fill_(1.0)
        x = torch.rand(1, 3, 32, 32)
        model(x)
        assert torch.allclose(seen[0], model.bn_clr(model.backbone(x)))
    plain = new_model(_params().model, K)
    assert "bn_clr.weight" in model.state_dict() and "bn_clr.weight" not in plain.state_dict()


# -------------------------------------------------------------------------------------------- EMA mode
@pytest.mark.parametrize("train_mode", [False, True])
def test_ema_model_mode_follows_the_param(train_mode: bool) -> None:
    params = _params(**{"adapt.ema_train_mode": train_mode})
    model = new_model(params.model, K)
    task = ProDATask(_ctx(), model, PrototypeBank(K, model.feat_dim), params.adapt)
    ema = task.ema.module
    assert all(m.training == train_mode for m in batchnorms(ema))
    assert all(not p.requires_grad for p in ema.parameters())


# ------------------------------------------------------------------------------------------- resolutions
def test_views_drawn_at_base_width_equal_views_of_the_rescaled_image() -> None:
    # A 32x64 image read as stored, views drawn from it at width 128 (the public --resize) = views of the image
    # first resized to 64x128: the same pixels, and coordinates that still point into the stored image.
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8, generator=g)
    big = torchvision.transforms.functional.resize(image, [64, 128], antialias=True)
    cfg = WeakViewConfig(crop_size=(24, 40), scale_range=(1.0, 1.0), hflip_p=0.0)
    at_base = make_weak_view(image, None, WeakViewConfig((24, 40), (1.0, 1.0), 0.0, base_width=128), _gen())
    resized = make_weak_view(big, None, cfg, _gen())
    assert at_base.ops[1] == resized.ops[1]  # the same crop window
    assert torch.equal(at_base.coords, resized.coords)  # normalised: valid for the stored and the resized image
    # Upscaling samples the crop bilinearly from the stored image: close to resize-then-crop, not equal.
    assert (at_base.image - resized.image).abs().mean() < 0.05


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(11)


# -------------------------------------------------------------------------------------------- schedules
def test_the_public_schedule_ends_at_a_third_of_the_base_lr() -> None:
    # 84 epochs x 743 iterations of a 90,000-iteration poly(0.9): the last step's lr factor.
    assert poly_factor(62411, 90000, 0.9) == pytest.approx((1 - 62411 / 90000) ** 0.9)
    assert 0.34 < poly_factor(62411, 90000, 0.9) < 0.35
    preset = parse_params(yaml.safe_load((REPO / "params/gta5_cityscapes.yaml").read_text()))
    for section in (preset.warmup, preset.adapt, preset.distill):
        assert (section.optim.iters, section.optim.schedule_iters) == (62412, 90000)
