"""ProDA stage 1: online prototypical pseudo-label rectification + target structure learning.

Per step (the paper, Sec. 3.2-3.3; forwards as in the public stage 1, github.com/microsoft/ProDA):
- source: CE on a weak view, in a forward of its own (BatchNorm never mixes the domains);
- target: one student forward over the weak view x_t and its strong view T(x_t) (target-only statistics);
- the EMA model sees the full un-augmented image; its features and the FIXED soft pseudo labels p0 (from the
  zarr store) are warped into the weak view at `target_scale` of the crop; ω = softmax(-d/τ) over prototype
  distances rectifies p0 (ŷ = argmax ω ⊙ p0), and the student's weak-view prediction p_t learns ŷ with
  symmetric CE (paper Eq. 3 uses p_t of x_t), plus the regulariser -mean log p_t (Eq. 7);
- structure learning: KL(z_T || z_T') between the prototype assignments of the EMA features (warped into the
  strong view) and of the student's strong-view features, over valid (non-padded, non-cutout) pixels, averaged
  over pixels and classes (the public code's normalisation, for which γ1 = 10 was tuned);
- after the optimiser step: EMA update of the model, prototype EMA update (λ) from the EMA's full-image
  features with the EMA's argmax as class, reduced across DDP ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function

from pipeline.config import AdaptParams
from pipeline.data.labels import IGNORE_INDEX as IGNORE
from pipeline.data.views import coords_at, downsample_valid, warp_to_view
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.context import Context, Data, model_params, read_model
from pipeline.engine.loop import autocast, build_optimizer, collate
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
from pipeline.files import sha256_file, write_json
from pipeline.maths.losses import cross_entropy, entropy_regulariser, structure_kl, symmetric_ce
from pipeline.maths.metrics import class_argmax
from pipeline.maths.prototypes import PrototypeBank, proto_logits
from pipeline.maths.resize import resize_bilinear
from pipeline.maths.selection import PrototypeRectification
from pipeline.methods.self_training import TargetViews
from pipeline.models import ModelEMA, param_groups
from pipeline.store.pseudo_store import PseudoLabelStore
from pipeline.store.quality import QualityAccumulator

# The loss terms of stage 1, each named as its params switch (``adapt.<name>: {enabled, weight}``).
TARGET_CE = Term("target_ce", "(symmetric) CE of the weak-view prediction on the rectified pseudo labels (Eq. 3)")
STRUCTURE_KL = Term("structure_kl", "KL between the EMA's and the student's prototype assignments (Eq. 6)")
REGULARISER = Term("regulariser", "-mean log p of the weak-view prediction (Eq. 7)")
TERMS = (SOURCE_CE, TARGET_CE, STRUCTURE_KL, REGULARISER)
#: Logged beside the terms: the share of target pixels whose label the rectification changed.
RECT_CHANGED = "rect_changed"
DIAGNOSTICS = (RECT_CHANGED,)


class ProDATask:
    def __init__(self, ctx: Context, model: nn.Module, bank: PrototypeBank, p: AdaptParams) -> None:
        self.p, self.ctx = p, ctx
        self.model = model
        self.net = wrap_ddp(model, ctx)
        self.ema = ModelEMA(model, p.ema_momentum)
        # The public EMA model is never put in eval mode (adapt.ema_train_mode).
        self.ema.module.train(p.ema_train_mode)
        self.bank = bank.to(ctx.info.device)
        groups = param_groups(model, p.optim.lr, p.optim.head_lr_mult, p.optim.weight_decay)
        self._opt = build_optimizer(groups, p.optim)
        self._proto_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.net}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self._opt}

    def extras(self) -> dict:
        return {"ema": self.ema, "prototypes": self.bank}

    @staticmethod
    def loss_names(p: AdaptParams) -> list[str]:
        """The curve columns: the terms the params switch on, then the diagnostics."""
        return [*active(TERMS, p), *DIAGNOSTICS]

    def loss(self, batch: dict[str, dict], it: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # record_function scopes name the parts of the step for bench_adapt_cost's profile (free otherwise).
        p, src, tgt = self.p, batch["source"], batch["target"]
        with record_function("stage1/source_forward_ce"):
            losses = Losses(p)
            source_forward(self.net, src, losses, p.target_bn)
        n = tgt["weak_image"].shape[0]
        out_size = target_size(tgt["image"].shape[-2:], p.target_scale)
        with record_function("stage1/target_forward"):
            logits, feats = self.net(torch.cat([tgt["weak_image"], tgt["image"]]))
        with record_function("stage1/upsample_masks"):
            w_logits, s_feat = resize_bilinear(logits[:n], out_size), resize_bilinear(feats[n:], out_size)
            w_valid = downsample_valid(tgt["weak_valid"], out_size)
            s_valid = downsample_valid(tgt["valid"], out_size)
        with torch.no_grad(), record_function("stage1/ema_forward"):
            ema = self.ema.module
            with autocast(self.ctx.info.device, p.optim.amp):
                e_logits, f_full = ema(tgt["full"].float() / 255.0)
            e_logits, f_full = e_logits.float(), f_full.float()
        with torch.no_grad(), record_function("stage1/rectify_warps_prototypes"):
            protos, ok = self.bank.protos, self.bank.initialized
            # Fixed soft pseudo labels and EMA features, brought into the weak view's geometry.
            weak_at = coords_at(tgt["weak_coords"], out_size)
            p0 = warp_to_view(tgt["soft"].float(), weak_at)
            # The EMA's prototype logits at the weak view's pixels (for ω) and at the strong view's (z_T), from
            # one warp and one distance computation over both coordinate maps side by side.
            w = out_size[1]
            both = torch.cat([weak_at, coords_at(tgt["coords"], out_size)], dim=-1)
            e_proto = proto_logits(warp_to_view(f_full, both), protos, p.tau, ok)
            omega = torch.softmax(e_proto[..., :w], dim=1) if p.rectify else torch.ones_like(p0)
            target, _ = PrototypeRectification(omega, p.conf_threshold, IGNORE).select(p0, w_valid)
            raw = class_argmax(p0)
            losses.log(RECT_CHANGED, ((raw != target) & w_valid).float().sum() / w_valid.sum().clamp(min=1))
            z_t = e_proto[..., w:]
            # Prototype update input: the EMA's full-image features with its own argmax (as the public code).
            self._proto_batch = (f_full, class_argmax(e_logits))

        with record_function("stage1/target_losses"):
            if losses.on(TARGET_CE):
                if p.target_ce.symmetric:
                    losses.add(TARGET_CE, symmetric_ce(w_logits, target, p.sce_alpha, p.sce_beta, IGNORE))
                else:
                    losses.add(TARGET_CE, cross_entropy(w_logits, target, IGNORE))
            if losses.on(STRUCTURE_KL):
                losses.add(STRUCTURE_KL, structure_kl(z_t, proto_logits(s_feat, protos, p.tau, ok), s_valid))
            if losses.on(REGULARISER):
                losses.add(REGULARISER, entropy_regulariser(w_logits, w_valid))
        return losses.total, losses.logs

    def after_step(self, it: int) -> None:
        with record_function("stage1/ema_update"):
            self.ema.update(self.net)
        if self._proto_batch is not None:
            with record_function("stage1/prototype_update"):
                feat, lab = self._proto_batch
                self.bank.ema_update(feat, lab, self.p.proto_momentum, self.p.min_pixels, IGNORE)
            self._proto_batch = None


@torch.no_grad()
def rectified_quality(ctx: Context, data: Data, task: ProDATask, store_path: Path, batch_size: int) -> dict | None:
    """Quality of raw vs rectified pseudo labels on target train (full images, final EMA and prototypes)."""
    gt_ds = data.dataset("target_train", with_labels=True)
    labelled = [i for i, r in enumerate(gt_ds.records) if r.label is not None]  # partly labelled sets too
    if not labelled:
        return None
    store = PseudoLabelStore(store_path)
    raw_acc = QualityAccumulator(ctx.num_classes, 0.0)
    rect_acc = QualityAccumulator(ctx.num_classes, 0.0)
    ema = task.ema.module.eval()
    bs = batch_size
    for start in range(0, len(labelled), bs):
        samples = [gt_ds.load(i) for i in labelled[start : start + bs]]
        batch = collate(samples)
        with autocast(ctx.info.device, True):
            feat = ema(batch["image"].to(ctx.info.device).float() / 255.0)[1].float()
        soft = torch.stack([torch.from_numpy(store.get(i)["soft"]) for i in batch["id"]]).to(feat.device)
        omega = torch.softmax(proto_logits(feat, task.bank.protos, task.p.tau, task.bank.initialized), dim=1)
        lab, prob = PrototypeRectification(omega, 0.0, IGNORE).rectified(soft)
        for j in range(len(samples)):
            gt = batch["label"][j].numpy()
            conf, raw = soft[j].max(0)  # one reduction for the raw label and its confidence
            raw_acc.update(raw.cpu().numpy(), conf.cpu().numpy(), gt)
            rect_acc.update(lab[j].cpu().numpy(), prob[j].max(0).values.cpu().numpy(), gt)
    return {"raw": raw_acc.summary(ctx.class_names), "rectified": rect_acc.summary(ctx.class_names)}


def train_adapt(
    ctx: Context,
    data: Data,
    p: AdaptParams,
    warmup: Path,
    store_path: Path,
    protos_path: Path,
    out: TrainOutputs,
    rectified_metrics: Path,
    eval_batch: int,
) -> dict:
    """Stage 1 from the warm-up model file, its soft pseudo labels and initial prototypes.

    Writes ``out`` (plus ``prototypes.pt`` and ``ema.pt`` in ``out.models``) and the raw vs rectified
    pseudo-label quality to ``rectified_metrics`` when target train has ground truth.
    """
    model, meta = read_model(warmup, ctx)
    model.set_freeze_bn(p.freeze_bn).train()
    store = PseudoLabelStore(store_path)
    tgt_ds_ids = data.dataset("target_train", with_labels=False).ids
    store.check_matches(tgt_ds_ids, ctx.class_names)
    if not store.has_soft:
        raise ValueError(f"pseudo-label store {store_path} has no soft labels; stage 1 needs them")
    bank = PrototypeBank.from_file(protos_path, num_classes=ctx.num_classes)
    if bank.feat_dim != model.feat_dim:
        raise ckpt.CheckpointError(
            f"{protos_path} holds {bank.feat_dim}-d prototypes, the model's features are {model.feat_dim}-d"
        )
    task = ProDATask(ctx, model, bank, p)
    bs = p.optim.batch_size
    streams = {
        "source": stream(ctx, data, "source", True, WeakTransform(p.view), bs, salt=0),
        "target": stream(ctx, data, "target_train", False, TargetViews(p.view, p.strong, store_path), bs, salt=1),
    }
    inputs = [sha256_file(x) for x in (warmup, protos_path, data.manifest("source"))] + [store.checkpoint_sha256]
    metrics = run_training(
        ctx,
        task,
        streams,
        p.optim,
        model_params(meta),
        evaluator=make_evaluator(ctx, data, eval_batch),
        out=out,
        loss_names=ProDATask.loss_names(p),
        section=p.model_dump(mode="json"),
        inputs=inputs,
        finalize=precise_bn(ctx, data, p.precise_bn, eval_batch),
    )
    if ctx.info.is_main:
        task.bank.save(out.models / "prototypes.pt", ctx.class_names)
        ckpt.save_atomic(task.ema.state_dict(), out.models / "ema.pt")
        q = ctx.step("rectified_quality", rectified_quality, ctx, data, task, store_path, eval_batch)
        if q is not None:
            metrics["rectified_pseudo_labels"] = {k: v["miou"] for k, v in q.items()}
            write_json(rectified_metrics, {k: {m: v[m] for m in ("pixel_acc", "miou")} for k, v in q.items()})
    return metrics
