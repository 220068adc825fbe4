"""Supervised training task (source warm-up, oracle) with optional output-space adversarial alignment.

The adversarial part follows AdaptSegNet: an LS-GAN discriminator on the softmax of the upsampled
predictions; the segmentation net is pushed to make target outputs look like source outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.config import AdversarialParams, ModelParams, OptimParams, OracleParams, WarmupParams
from pipeline.data.datasets import DatasetError
from pipeline.distributed import DistInfo, unwrap
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.context import Context, Data, new_model, read_model
from pipeline.engine.loop import build_optimizer, evaluate
from pipeline.engine.terms import Term
from pipeline.engine.training import (
    TrainOutputs,
    WeakTransform,
    make_evaluator,
    run_training,
    stream,
    target_train_images,
    wrap_ddp,
    write_skipped,
)
from pipeline.files import sha256_file, write_json
from pipeline.maths.losses import cross_entropy, lsgan_d_loss, lsgan_g_loss
from pipeline.maths.resize import resize_bilinear
from pipeline.models import Discriminator, estimate_bn_stats, param_groups

# The loss terms of the supervised stages (the adversarial pair only with ``warmup.adversarial.enabled``).
CE = Term("ce", "cross-entropy on the labelled images", always=True)
ADV_G = Term("adv_g", "LS-GAN term pushing target predictions to look like source ones", always=True)
ADV_D = Term("adv_d", "the discriminator's LS-GAN loss (moves the discriminator only)", always=True)


class SupervisedTask:
    """CE on a labelled stream ("labeled"); with `adv.enabled`, LS-GAN alignment to the "target" stream."""

    def __init__(
        self,
        model: nn.Module,
        wrapped: nn.Module,
        optim: OptimParams,
        num_classes: int,
        adv: AdversarialParams | None = None,
        wrap=lambda m: m,
    ) -> None:
        self.model, self.net = model, wrapped
        groups = param_groups(model, optim.lr, optim.head_lr_mult, optim.weight_decay)
        self._opts = {"model": build_optimizer(groups, optim)}
        self._mods: dict[str, nn.Module] = {"model": wrapped}
        self.adv = adv if adv is not None and adv.enabled else None
        if self.adv is not None:
            disc = Discriminator(num_classes, ndf=self.adv.ndf).to(next(model.parameters()).device)
            self.disc = wrap(disc)
            self._mods["disc"] = self.disc
            self._opts["disc"] = torch.optim.Adam(
                [{"params": disc.parameters(), "lr": self.adv.lr, "base_lr": self.adv.lr}],
                lr=self.adv.lr,
                betas=tuple(self.adv.betas),
            )

    def modules(self) -> dict[str, nn.Module]:
        return self._mods

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._opts

    def extras(self) -> dict:
        return {}

    def after_step(self, it: int) -> None:
        pass

    def loss(self, batch: dict[str, dict], it: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        src = batch["labeled"]
        if self.adv is None:
            logits, _ = self.net(src["image"])
            ce = cross_entropy(logits, src["label"])
            return ce, {CE.name: ce.detach()}
        tgt = batch["target"]
        n = src["image"].shape[0]
        # One forward over both domains: a single DDP forward per step, and shared BN statistics.
        logits, _ = self.net(torch.cat([src["image"], tgt["image"]]))
        size = src["image"].shape[-2:]
        up = resize_bilinear(logits, size)  # once for both domains: the CE reuses the source half
        probs = F.softmax(up, dim=1)
        ce = cross_entropy(up[:n], src["label"])
        # Generator term through a frozen copy of the discriminator's weights, so it updates only the net.
        d = unwrap(self.disc)
        frozen = {k: v.detach() for k, v in d.named_parameters()}
        g_adv = lsgan_g_loss(functional_call(d, frozen, (probs[n:],)))
        d_out = self.disc(probs.detach())
        d_loss = lsgan_d_loss(d_out[:n], d_out[n:])
        total = ce + self.adv.weight * g_adv + d_loss
        return total, {CE.name: ce.detach(), ADV_G.name: g_adv.detach(), ADV_D.name: d_loss.detach()}


def train_supervised(
    ctx: Context,
    data: Data,
    sec: WarmupParams | OracleParams,
    mp: ModelParams,
    labeled: str,
    out: TrainOutputs,
    eval_batch: int,
) -> dict:
    """Supervised training on the ``labeled`` split (warm-up: "source"; oracle: "target_train").

    With ``sec.adversarial.enabled`` (the warm-up's section has one), LS-GAN alignment to target train.
    """
    adv = getattr(sec, "adversarial", None)
    model = ctx.place(new_model(mp, ctx.num_classes)).set_freeze_bn(sec.freeze_bn)
    task = SupervisedTask(model, wrap_ddp(model, ctx), sec.optim, ctx.num_classes, adv, wrap=lambda m: wrap_ddp(m, ctx))
    tf = WeakTransform(sec.view)
    streams = {"labeled": stream(ctx, data, labeled, True, tf, sec.optim.batch_size, salt=0)}
    terms = [CE]
    if task.adv is not None:
        streams["target"] = stream(ctx, data, "target_train", False, tf, sec.optim.batch_size, salt=1)
        terms += [ADV_G, ADV_D]
    inputs = [sha256_file(data.manifest(n)) for n in (labeled, "target_train", "target_val")]
    return run_training(
        ctx,
        task,
        streams,
        sec.optim,
        mp,
        evaluator=make_evaluator(ctx, data, eval_batch),
        out=out,
        loss_names=[t.name for t in terms],
        section=sec.model_dump(mode="json"),
        inputs=inputs,
    )


def train_oracle(
    ctx: Context, data: Data, p: OracleParams, mp: ModelParams, out: TrainOutputs, eval_batch: int
) -> dict:
    """The oracle: the same engine trained on target-train labels, the report's upper bound.

    With ``p.enabled`` false (a target without train labels) it writes a note instead of a model; when enabled,
    every target-train image must have its label.
    """
    if not p.enabled:
        reason = "oracle.enabled is false: no model trained on target labels (the report has no oracle row)"
        return write_skipped(out, reason, ctx.info.is_main)
    records = data.dataset("target_train", with_labels=True).records
    missing = [r.image for r in records if r.label is None]
    if missing:
        raise DatasetError(
            f"the oracle trains on target-train labels, but {len(missing)} of {len(records)} images have none "
            f"(e.g. {missing[0]}); set oracle.enabled: false for an unlabelled target"
        )
    return train_supervised(ctx, data, p, mp, "target_train", out, eval_batch)


def align_bn_to_target(ctx: Context, data: Data, out_dir: Path, metrics_path: Path, batch_size: int) -> dict | None:
    """Target BatchNorm statistics for a source-trained model (AdaBN), with the model as trained kept.

    ``out_dir/last.pt`` becomes ``out_dir/source_only.pt`` (the report's source-only row); BatchNorm running
    statistics are re-estimated on the unlabelled target train images (read as every stage reads them, no
    augmentation) and the result is written as ``out_dir/last.pt`` (and ``best.pt``). Weights are unchanged.
    The metrics file gains the source-only figures under ``source_only``. Rank 0 alone does it (a few hundred
    forward passes and an evaluation of its own); other ranks return None.
    """
    if not ctx.info.is_main:
        return None
    local = DistInfo(0, 1, 0, ctx.info.device)
    last, kept = out_dir / "last.pt", out_dir / "source_only.pt"
    model, saved_meta = read_model(last, ctx)
    bs = batch_size
    n = estimate_bn_stats(model, target_train_images(ctx, data, bs))
    val = data.dataset("target_val", with_labels=True)
    cm = evaluate(model, val, ctx.num_classes, local, bs)
    aligned = cm.summary(ctx.class_names)
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics = {
        **metrics,
        "source_only": {k: metrics.get(k) for k in ("miou", "pixel_acc", "per_class_iou")},
        "miou": aligned["miou"],
        "pixel_acc": aligned["pixel_acc"],
        "per_class_iou": aligned["per_class_iou"],
        "target_bn_images": n,
    }
    shutil.copyfile(last, kept)
    meta = {**saved_meta, "note": "source training + BatchNorm statistics of target train (AdaBN)"}
    meta["metrics"] = {k: v for k, v in aligned.items() if k != "per_class_iou"}
    payload = ckpt.model_payload(model.state_dict(), meta)
    ckpt.save_atomic(payload, last)
    # best.pt was picked among source-trained checkpoints; the aligned model has no such selection.
    ckpt.save_atomic(payload, out_dir / "best.pt")
    write_json(metrics_path, metrics)
    return metrics
