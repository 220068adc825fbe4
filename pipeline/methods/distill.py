"""Knowledge-distillation rounds (ProDA stages 2/3).

Loss = source CE + CE on the teacher's hard labels kept by the round's selection (strong view)
+ β·KL(p_teacher || p_student), the KL computed with the student's log-probabilities (the public code passes
probabilities where `kl_div` needs log-probabilities, so its term can go negative; this one cannot)
[+ CRST's MRKLD regulariser]. With ``kd_beta: 0`` and the teacher of round 1 being the warm-up, the rounds are
plain self-training; ``selection.kind: class_balanced`` makes them CBST, and the regulariser CRST.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import DistillParams, ModelParams
from pipeline.data.labels import IGNORE_INDEX as IGNORE
from pipeline.data.views import downsample_valid, warp_to_view
from pipeline.engine.context import Context, Data, model_params, model_params_of, new_model, read_model
from pipeline.engine.loop import build_optimizer
from pipeline.engine.terms import Losses, Term, active
from pipeline.engine.training import (
    SOURCE_CE,
    TrainOutputs,
    WeakTransform,
    make_evaluator,
    precise_bn,
    run_training,
    source_forward,
    stream,
    target_size,
    wrap_ddp,
)
from pipeline.files import sha256_file
from pipeline.maths.losses import cross_entropy, entropy_regulariser, kd_kl
from pipeline.maths.resize import resize_bilinear
from pipeline.maths.selection import ClassBalanced, ConfidenceThreshold, renormalise
from pipeline.methods.rounds import round_selection
from pipeline.methods.self_training import TargetViews
from pipeline.models import SegModel, load_backbone_weights, param_groups
from pipeline.store.pseudo_store import PseudoLabelStore

# The loss terms of a KD round.
HARD_CE = Term("hard_ce", "CE on the teacher's labels kept by the round's selection (strong view)", always=True)
KD = Term("kd", "KL(p_teacher || p_student) on the teacher's soft map", weight_key="kd_beta")
REGULARISER = Term("regulariser", "CRST's MRKLD: -mean log p of the student's target prediction (KL to uniform)")
TERMS = (SOURCE_CE, HARD_CE, KD, REGULARISER)


class DistillTask:
    def __init__(
        self, ctx: Context, model: nn.Module, p: DistillParams, selection: ConfidenceThreshold | ClassBalanced
    ) -> None:
        self.p, self.ctx, self.selection = p, ctx, selection
        self.net = wrap_ddp(model, ctx)
        groups = param_groups(model, p.optim.lr, p.optim.head_lr_mult, p.optim.weight_decay)
        self._opt = build_optimizer(groups, p.optim)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self._opt}

    def extras(self) -> dict:
        return {}

    def after_step(self, it: int) -> None:
        pass

    @staticmethod
    def loss_names(p: DistillParams) -> list[str]:
        return active(TERMS, p)

    def loss(self, batch: dict[str, dict], it: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p, src, tgt = self.p, batch["source"], batch["target"]
        losses = Losses(p)
        source_forward(self.net, src, losses, p.target_bn)
        out_size = target_size(tgt["image"].shape[-2:], p.target_scale)
        s_logits = resize_bilinear(self.net(tgt["image"])[0], out_size)
        with torch.no_grad():
            valid = downsample_valid(tgt["valid"], out_size)
            if "soft" in tgt:
                # Labels and confidence from the bilinearly warped soft map: the stride-8 hard map warped
                # nearest loses thin structures (perfect ground truth pooled that way: 40.0 vs 44.9 mIoU).
                t_soft = warp_to_view(tgt["soft"].float(), tgt["coords"], out_size)
                # Stored probabilities are rounded (uint8: each class to 1/255, float16), so a pixel sums to 1
                # only within about K/510: renormalised, the KD target is a distribution and its KL is >= 0.
                t_soft = renormalise(t_soft)
                if isinstance(self.selection, ClassBalanced):  # the class-normalised argmax needs every class
                    label, _ = self.selection.select(t_soft, valid)
                else:
                    conf, label = t_soft.max(dim=1)
                    label = self.selection.apply(label, conf, valid)
            else:
                t_soft = None
                label = warp_to_view(tgt["pl_label"], tgt["coords"], out_size, mode="nearest", fill=IGNORE)
                conf = warp_to_view(tgt["pl_conf"].float(), tgt["coords"], out_size, mode="nearest")
                label = self.selection.apply(label, conf, valid)
        losses.add(HARD_CE, cross_entropy(s_logits, label, IGNORE))
        if t_soft is not None and losses.on(KD):
            losses.add(KD, kd_kl(t_soft, s_logits, valid))
        if losses.on(REGULARISER):
            losses.add(REGULARISER, entropy_regulariser(s_logits, valid))
        return losses.total, losses.logs


def student(ctx: Context, p: DistillParams, r: int, teacher_path: Path) -> tuple[SegModel, ModelParams]:
    """Round ``r``'s student and its architecture, as ``distill.rounds[r].student_init`` says: the teacher's
    weights and architecture ("previous"), or the teacher's architecture with a backbone from
    ``distill.student_weights`` ("pretrained", plus the extra BatchNorm on the backbone output with
    ``distill.student_bn_clr``, as the public SimCLR student), or random ("scratch")."""
    init = p.rounds[r].student_init
    if init == "previous":
        teacher, meta = read_model(teacher_path, ctx)
        return teacher, model_params(meta)
    mp = model_params_of(teacher_path)
    if init == "pretrained" and p.student_bn_clr:
        mp = mp.model_copy(update={"bn_clr": True})
    model = new_model(mp, ctx.num_classes)
    if init == "pretrained":
        load_backbone_weights(model, p.student_weights)
    return ctx.place(model), mp


def train_distill(
    ctx: Context,
    data: Data,
    p: DistillParams,
    r: int,
    teacher_path: Path,
    store_path: Path,
    out: TrainOutputs,
    eval_batch: int,
) -> dict:
    """KD round ``r``: a student learns from the teacher's labels in ``store_path``; writes ``out``."""
    store = PseudoLabelStore(store_path)
    store.check_matches(data.dataset("target_train", with_labels=False).ids, ctx.class_names)
    if p.kd_beta > 0 and not store.has_soft:
        raise ValueError(f"distill.kd_beta > 0 needs soft labels, but {store_path} has none (teacher.store_soft)")
    selection = round_selection(p.selection, p.conf_threshold, r, store_path)
    model, mp = student(ctx, p, r, teacher_path)
    model.set_freeze_bn(p.freeze_bn).train()
    task = DistillTask(ctx, model, p, selection)
    bs = p.optim.batch_size
    streams = {
        "source": stream(ctx, data, "source", True, WeakTransform(p.view), bs, salt=0),
        "target": stream(ctx, data, "target_train", False, TargetViews(p.view, p.strong, store_path), bs, salt=1 + r),
    }
    inputs = [sha256_file(teacher_path), store.checkpoint_sha256, sha256_file(data.manifest("source")), r]
    if p.rounds[r].student_init == "pretrained":  # other weights under the same path must not resume stale state
        inputs.append(sha256_file(Path(p.student_weights)))
    return run_training(
        ctx,
        task,
        streams,
        p.optim,
        mp,
        evaluator=make_evaluator(ctx, data, eval_batch),
        out=out,
        loss_names=DistillTask.loss_names(p),
        section=p.model_dump(mode="json"),
        inputs=inputs,
        finalize=precise_bn(ctx, data, p.precise_bn, eval_batch),
        extra_metrics={"selection": describe_selection(selection, ctx.class_names)},
    )


def describe_selection(selection: ConfidenceThreshold | ClassBalanced, class_names: list[str]) -> dict:
    """The selection a round trained with, for its metrics (class-balanced thresholds by class name)."""
    d = selection.describe()
    if "thresholds" in d:
        d["thresholds"] = {n: round(t, 6) for n, t in zip(class_names, d["thresholds"], strict=True)}
    return d
