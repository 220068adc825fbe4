"""One training step of ProDA stage 1 and of a KD round, checked for what goes through which forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pipeline.methods.distill as distill_mod
import pipeline.methods.proda as proda_mod
from pipeline.config import parse_params
from pipeline.data.labels import class_names
from pipeline.data.views import warp_to_view
from pipeline.distributed import DistInfo
from pipeline.engine.context import Context
from pipeline.engine.loop import collate
from pipeline.maths.losses import kd_kl
from pipeline.maths.prototypes import PrototypeBank
from pipeline.maths.selection import ClassBalanced, ConfidenceThreshold
from pipeline.methods.distill import DistillTask
from pipeline.methods.proda import ProDATask
from pipeline.methods.self_training import TargetViews
from pipeline.models import build_model
from tests.tiny import tiny_params

K = 19


def _ctx(params) -> Context:
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Context("adapt", 0, info, class_names(K))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", K, width=8, feat_dim=16, head_dilations=(1, 2, 3, 4), gn_groups=8, se_reduction=4)


def _record_batches(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


def _source(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 32, 32, generator=g), "label": torch.randint(0, K, (n, 32, 32), generator=g)}


def test_stage1_source_and_target_forwards_are_separate() -> None:
    params = parse_params(tiny_params())
    p = params.adapt
    model = _model()
    bank = PrototypeBank(K, model.feat_dim)
    bank.protos.normal_()
    bank.initialized[:10] = True
    task = ProDATask(_ctx(params), model, bank, p)
    seen = _record_batches(model)  # the student only (the EMA copy was made before the hook)

    views = TargetViews(p.view, p.strong, None)
    g = torch.Generator().manual_seed(2)
    samples = []
    for i in range(2):
        s = views({"index": i, "id": f"t{i}", "image": torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8)}, g)
        s["soft"] = F.softmax(torch.randn(K, 4, 8, generator=g), dim=0)
        samples.append(s)
    tgt = collate(samples)
    src = _source(2)
    total, logs = task.loss({"source": src, "target": tgt}, 0)

    # Source alone first (its own BatchNorm statistics), then the weak and strong target views together.
    assert [b.shape[0] for b in seen] == [2, 4]
    assert torch.equal(seen[0], src["image"])
    assert torch.equal(seen[1], torch.cat([tgt["weak_image"], tgt["image"]]))
    assert {t.name for t in proda_mod.TERMS} <= set(logs)
    total.backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)


def test_stage1_sce_and_regulariser_see_the_weak_view() -> None:
    # With the structure KL off and no source CE, the only student forward that matters is the weak view's:
    # the gradient does not change when the strong view's pixels change.
    params = parse_params(
        tiny_params(**{"adapt.structure_kl": {"enabled": False, "weight": 1.0}, "adapt.source_ce.enabled": False})
    )
    p = params.adapt
    grads = []
    for strong_fill in (0.0, 1.0):
        model = _model()
        model.eval()  # no dropout / batch statistics: the two runs differ only by their inputs
        bank = PrototypeBank(K, model.feat_dim)
        task = ProDATask(_ctx(params), model, bank, p)
        views = TargetViews(p.view, p.strong, None)
        g = torch.Generator().manual_seed(3)
        s = views({"index": 0, "id": "t0", "image": torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8)}, g)
        s["soft"] = F.softmax(torch.randn(K, 4, 8, generator=g), dim=0)
        tgt = collate([s])
        tgt["image"] = torch.full_like(tgt["image"], strong_fill)
        total, _ = task.loss({"source": _source(1), "target": tgt}, 0)
        total.backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
    assert torch.allclose(grads[0], grads[1])


def _distill_loss_call(
    overrides: dict, soft: torch.Tensor, g: torch.Generator, name: str, owner: object = distill_mod
) -> tuple[tuple, dict]:
    """One KD-round loss on a target view whose store holds `soft`; returns the arguments of distill's call of
    `name` (a function it imports, or a method of `owner`) and the target batch."""
    params = parse_params(tiny_params(**overrides))
    p = params.distill
    selection = ClassBalanced([0.3] * K, 0.2) if p.selection.kind == "class_balanced" else ConfidenceThreshold(0.95)
    task = DistillTask(_ctx(params), _model(), p, selection)
    views = TargetViews(p.view, p.strong, None)
    views.store = _Store(soft)
    s = views({"index": 0, "id": "t0", "image": torch.randint(0, 256, (3, 32, 64), dtype=torch.uint8)}, g)
    tgt = collate([s])
    real, calls = getattr(owner, name), []

    def spy(*args):
        calls.append(args)
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(owner, name, spy)
        task.loss({"source": _source(1), "target": tgt}, 0)
    return calls[0], tgt


def test_kd_labels_come_from_the_bilinearly_warped_soft_map() -> None:
    # The teacher's soft map is stored at stride 8 (4x8 for a 32x64 image). KD labels and confidences are
    # the argmax / max of that map warped bilinearly into the view, not its stride-8 hard map warped nearest.
    overrides = {"distill.source_ce.enabled": False, "distill.kd_beta": 0.0, "distill.target_scale": 1.0}
    g = torch.Generator().manual_seed(4)
    soft = F.softmax(3 * torch.randn(K, 4, 8, generator=g), dim=0)
    (_, got_label, got_conf, _), tgt = _distill_loss_call(overrides, soft, g, "apply", ConfidenceThreshold)
    warped = warp_to_view(soft[None], tgt["coords"], (32, 32))
    valid = tgt["valid"]
    conf, label = warped.max(dim=1)
    assert torch.equal(got_label[valid], label[valid])
    assert torch.allclose(got_conf[valid], conf[valid])
    nearest = warp_to_view(soft.argmax(0)[None], tgt["coords"], (32, 32), mode="nearest", fill=255)
    assert (nearest[valid] != label[valid]).any()  # the two derivations differ on this map


def test_class_balanced_kd_labels_use_the_whole_warped_soft_map() -> None:
    """CBST's class-normalised argmax needs every class's probability: the KD step hands it the warped map."""
    overrides = {
        "distill.source_ce.enabled": False,
        "distill.kd_beta": 0.0,
        "distill.target_scale": 1.0,
        "distill.selection.kind": "class_balanced",
        "distill.regulariser.enabled": True,
    }
    g = torch.Generator().manual_seed(4)
    soft = F.softmax(3 * torch.randn(K, 4, 8, generator=g), dim=0)
    (_, got_prob, _), tgt = _distill_loss_call(overrides, soft, g, "select", ClassBalanced)
    warped = warp_to_view(soft[None], tgt["coords"], (32, 32))
    valid = tgt["valid"][:, None].expand_as(warped)
    assert torch.allclose(got_prob[valid], warped[valid], atol=1e-6)


class _Store:
    """A pseudo-label store of one soft map (the reader's get() contract)."""

    def __init__(self, soft: torch.Tensor) -> None:
        self.soft = soft.numpy()

    def get(self, _id: str) -> dict:
        return {"soft": self.soft, "label": self.soft.argmax(0).astype("uint8"), "conf": self.soft.max(0)}


def test_kd_target_is_a_distribution_from_a_quantised_store() -> None:
    # The default stores the teacher's probabilities as uint8 (round(p * 255)), whose class sums miss 1 by up to
    # K/510; a KL to such a map goes negative when the student matches it (seen as kd=-0.001 in tiny runs).
    overrides = {"distill.source_ce.enabled": False, "distill.target_scale": 1.0}
    g = torch.Generator().manual_seed(5)
    quantised = (F.softmax(torch.randn(K, 4, 8, generator=g), dim=0) * 255).round() / 255
    (teacher, _, valid), tgt = _distill_loss_call(overrides, quantised, g, "kd_kl")
    raw_sums = warp_to_view(quantised[None], tgt["coords"], (32, 32)).sum(dim=1)[valid]
    assert (raw_sums - 1).abs().max() > 1e-3  # the stored map is not normalised ...
    assert torch.allclose(teacher.sum(dim=1)[valid], torch.ones(()), atol=1e-6)  # ... the KD target is
    # A student equal to the teacher: KL exactly 0 (the raw map gave a nonzero value of either sign).
    assert abs(float(kd_kl(teacher, teacher.clamp_min(1e-30).log(), valid))) < 1e-6
