"""Typed, validated parameters: ``params.yaml`` is loaded once into these objects.

Every section forbids unknown keys, so a typo stops the run with the key's dotted path in the message.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Prob = Annotated[float, Field(ge=0, le=1)]
Size = tuple[PosInt, PosInt]  # (height, width)


class ParamsError(ValueError):
    """A parameter file that cannot be used; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------- data
class EmbeddedParams(Strict):
    """The procedurally generated default dataset (GTA5 layout source, Cityscapes layout target).

    The style sections override the generator's domain defaults knob by knob (``pipeline.data.synth_style.SynthStyle``
    documents each); an unknown knob is an error.
    """

    seed: int
    height: Annotated[int, Field(ge=8)]
    width: Annotated[int, Field(ge=8)]
    n_source: PosInt
    n_target_train: PosInt
    n_target_val: PosInt
    source_style: dict[str, Any]
    target_style: dict[str, Any]

    @field_validator("source_style", "target_style")
    @classmethod
    def _known_knobs(cls, v: dict[str, Any]) -> dict[str, Any]:
        from pipeline.data.synth_style import SynthStyle

        known = {f.name for f in fields(SynthStyle)}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown style knob(s) {unknown}; known: {sorted(known)}")
        TypeAdapter(SynthStyle).validate_python({**SynthStyle().to_dict(), **v})
        return v

    def synth_config(self):
        from pipeline.data.synth_style import SynthConfig, SynthStyle, source_style, target_style

        return SynthConfig(
            seed=self.seed,
            height=self.height,
            width=self.width,
            n_source=self.n_source,
            n_target_train=self.n_target_train,
            n_target_val=self.n_target_val,
            source_style=SynthStyle.from_dict(self.source_style, base=source_style()),
            target_style=SynthStyle.from_dict(self.target_style, base=target_style()),
        )


class DomainParams(Strict):
    kind: Literal["gta5", "synthia", "cityscapes"]
    root: str
    # Optional (height, width) the images are resized to when read (the paper resizes GTA5 to 1280x720).
    resize: Size | None


class DataParams(Strict):
    # When set, the `generate` stage writes the embedded dataset; the source/target roots must point into it.
    embedded: EmbeddedParams | None
    source: DomainParams
    target: DomainParams
    num_classes: Literal[19, 16, 13]
    num_workers: NonNegInt

    @model_validator(mode="after")
    def _check_kinds(self) -> DataParams:
        if self.target.kind != "cityscapes":
            raise ValueError(f"data.target.kind: only 'cityscapes' layout targets exist, got '{self.target.kind}'")
        if self.source.kind == "cityscapes":
            raise ValueError("data.source.kind: the source must be 'gta5' or 'synthia'")
        if self.source.kind == "gta5" and self.num_classes != 19:
            raise ValueError(f"data.num_classes: GTA5 has 19 classes, got {self.num_classes}")
        if self.source.kind == "synthia" and self.num_classes == 19:
            raise ValueError("data.num_classes: SYNTHIA has 16 classes (or the 13-class subset), got 19")
        return self

    def image_size(self, domain: Literal["source", "target"]) -> Size | None:
        d = getattr(self, domain)
        if d.resize is not None:
            return d.resize
        if self.embedded is not None:
            return (self.embedded.height, self.embedded.width)
        return None


# ---------------------------------------------------------------------------------------------- model
class ModelParams(Strict):
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"]
    width: PosInt
    output_stride: Literal[8, 16, 32]
    feat_dim: PosInt
    head_dilations: tuple[PosInt, ...]
    dropout: Prob
    gn_groups: PosInt
    se_reduction: PosInt
    # An extra BatchNorm on the backbone's output, before the head: the public SimCLR student's `bn_clr`.
    bn_clr: bool
    # Local torchvision-format ResNet state dict; never downloaded. null = random init.
    pretrained: str | None


# ------------------------------------------------------------------------------------------- training
class ViewParams(Strict):
    crop: Size
    # The width images are rescaled to (aspect kept) before the random scale: the public code's --resize 2200,
    # so views are drawn from a larger image than inference reads. null: the random scale applies to the
    # image as read (data.<domain>.resize).
    base_width: PosInt | None
    # Random rescale factor range relative to the (base_width-rescaled) image.
    scale_range: tuple[PosFloat, PosFloat]
    hflip_p: Prob

    @model_validator(mode="after")
    def _order(self) -> ViewParams:
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError("scale_range: lower bound above upper bound")
        return self


class StrongParams(Strict):
    num_ops: NonNegInt
    magnitude_range: tuple[PosInt, PosInt]
    op_p: Prob
    cutout: bool
    cutout_frac: Prob
    hflip_p: Prob  # the public RandAugmentMC flips the strong view before its ops


class OptimParams(Strict):
    iters: PosInt
    # Horizon of the poly schedule (null: iters). Larger than iters ends training above lr 0: the public run
    # stops after 84 epochs (62,412 iterations) of a 90,000-iteration poly, at about 0.35x its base lr.
    schedule_iters: PosInt | None
    batch_size: PosInt  # global batch (split over DDP ranks)
    accum_steps: PosInt
    optimizer: Literal["sgd", "adam"]
    lr: PosFloat
    head_lr_mult: PosFloat
    momentum: NonNegFloat
    weight_decay: NonNegFloat
    lr_policy: Literal["poly", "cosine"]  # decay over the horizon (schedule_iters or iters)
    warmup_iters: NonNegInt  # linear lr ramp over the first iterations (0: none)
    poly_power: NonNegFloat
    amp: bool  # bf16 autocast where the device has bf16 kernels (CUDA, AVX512/AMX CPUs); fp32 elsewhere
    eval_every: NonNegInt  # 0: only at the end
    ckpt_every: PosInt
    log_every: PosInt

    @model_validator(mode="after")
    def _horizon(self) -> OptimParams:
        if self.schedule_iters is not None and self.schedule_iters < self.iters:
            raise ValueError(f"schedule_iters: {self.schedule_iters} is below iters {self.iters} (lr would be 0)")
        if self.warmup_iters >= self.iters:
            raise ValueError(f"warmup_iters: {self.warmup_iters} is not below iters {self.iters}")
        return self


class AdversarialParams(Strict):
    enabled: bool
    weight: NonNegFloat
    lr: PosFloat
    betas: tuple[Prob, Prob]
    ndf: PosInt


class WarmupParams(Strict):
    optim: OptimParams
    view: ViewParams
    freeze_bn: bool  # BatchNorm in eval mode with fixed affine params (the public warm-up's --freeze_bn)
    adversarial: AdversarialParams
    # After source training, re-estimate BatchNorm statistics on the unlabelled target train images (AdaBN);
    # the model as trained is kept as models/warmup/source_only.pt, the report's source-only row.
    target_bn: bool


class OracleParams(Strict):
    # False for a target without train labels (your fleet's images): no oracle model, no gap-closed figure.
    enabled: bool
    optim: OptimParams
    view: ViewParams
    freeze_bn: bool  # as warmup.freeze_bn


class PseudoLabelParams(Strict):
    batch_size: PosInt
    soft_dtype: Literal["float16", "uint8"]
    chunk_mb: PosFloat  # soft labels per zarr chunk (several images per chunk; see pipeline/store/pseudo_store.py)
    # Confidence threshold used only to report pseudo-label quality (coverage, accuracy of kept pixels).
    conf_threshold: Prob


class PrototypeParams(Strict):
    min_pixels: PosInt
    batch_size: PosInt


class LossSwitch(Strict):
    enabled: bool
    weight: NonNegFloat


class TargetCESwitch(LossSwitch):
    symmetric: bool


class PreciseBNParams(Strict):
    # After the last step, re-estimate BatchNorm running statistics on clean (un-augmented) target train
    # images ("precise BN"): training forwards see weak/strong views, whose statistics differ from clean
    # test images. At most `max_images` images, read in order.
    enabled: bool
    max_images: PosInt


class AdaptParams(Strict):
    optim: OptimParams
    view: ViewParams
    strong: StrongParams
    freeze_bn: bool  # as warmup.freeze_bn (the public stage 1 trains BatchNorm)
    ema_momentum: Prob
    # The EMA model in train mode, as the public code leaves it: BatchNorm normalises with the target batch's
    # own statistics and dropout is on. false: eval mode (running statistics, no dropout).
    ema_train_mode: bool
    proto_momentum: Prob
    tau: PosFloat
    min_pixels: PosInt
    # Target-side terms are computed at this fraction of the crop (the paper: 1/4).
    target_scale: Prob
    source_ce: LossSwitch
    rectify: bool
    # CE on the rectified labels: symmetric (SCE, the paper, with sce_alpha/sce_beta) or plain.
    target_ce: TargetCESwitch
    sce_alpha: NonNegFloat
    sce_beta: NonNegFloat
    conf_threshold: Prob
    structure_kl: LossSwitch
    regulariser: LossSwitch
    # BatchNorm running statistics follow the target only (source forwards do not update them).
    target_bn: bool
    precise_bn: PreciseBNParams


class TeacherParams(Strict):
    batch_size: PosInt
    flip: bool
    store_soft: bool
    soft_dtype: Literal["float16", "uint8"]
    chunk_mb: PosFloat  # as pseudo_label.chunk_mb
    conf_threshold: Prob  # used for the quality report; consumers apply their own


class RoundParams(Strict):
    # Model directory of this round's teacher (dvc.yaml passes <teacher>/last.pt to teacher@r and distill@r).
    teacher: str
    # The student's start: "previous": the teacher's weights (and architecture); "pretrained": the backbone from
    # distill.student_weights (the public stage 2: SimCLR); "scratch": random.
    student_init: Literal["previous", "pretrained", "scratch"]


class SelectionParams(Strict):
    """Which teacher pixels become a KD round's hard labels (pipeline/maths/selection.py)."""

    # threshold: the teacher's confidence >= distill.conf_threshold (plain self-training, ProDA's rounds);
    # class_balanced: CBST's per-class thresholds, each class keeping its top `portion` over target train.
    kind: Literal["threshold", "class_balanced"]
    portion: Prob  # round 1's portion (CBST: 0.2)
    portion_step: NonNegFloat  # added per round (CBST: 0.05)
    portion_max: Prob  # the portion stops growing here (CBST: 0.5)


class DistillParams(Strict):
    # One entry per KD round, keyed by round number (dvc.yaml's `foreach` builds teacher@r and distill@r).
    rounds: dict[PosInt, RoundParams]
    optim: OptimParams
    view: ViewParams
    strong: StrongParams
    conf_threshold: Prob
    selection: SelectionParams
    kd_beta: NonNegFloat
    regulariser: LossSwitch  # CRST's MRKLD: -mean log p of the student's target prediction (KL to uniform)
    target_scale: Prob
    source_ce: LossSwitch
    freeze_bn: bool  # as warmup.freeze_bn (the public KD stages train BatchNorm)
    student_weights: str | None  # local backbone file of the rounds whose student_init is "pretrained"
    # A "pretrained" student gets the extra BatchNorm on the backbone output (model.bn_clr), as the public
    # SimCLR student (--bn_clr); "previous" students keep their teacher's architecture.
    student_bn_clr: bool
    target_bn: bool  # as adapt.target_bn
    precise_bn: PreciseBNParams  # as adapt.precise_bn

    @model_validator(mode="after")
    def _rounds(self) -> DistillParams:
        if sorted(self.rounds) != list(range(1, len(self.rounds) + 1)):
            raise ValueError(f"rounds: keys must be 1..N, got {sorted(self.rounds)}")
        pretrained = [r for r, spec in self.rounds.items() if spec.student_init == "pretrained"]
        if pretrained and not self.student_weights:
            raise ValueError(f"student_weights: required, round {pretrained[0]} has student_init 'pretrained'")
        return self


class EvaluateParams(Strict):
    batch_size: PosInt
    n_overlays: NonNegInt


class BaseParams(Strict):
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    threads: NonNegInt  # torch CPU threads; 0: shared among the jobs on these cores (pipeline/cores.py)
    channels_last: bool  # NHWC memory format for the networks (bench/bench_adapt_cost.py measures both)
    # Under DDP on CUDA, BatchNorm layers that train are synchronised across processes (SyncBatchNorm), as the
    # public code's sync_bn; on CPU (gloo) each process keeps its own batch statistics.
    sync_bn: bool


class Params(Strict):
    base: BaseParams
    data: DataParams
    model: ModelParams
    warmup: WarmupParams
    oracle: OracleParams
    pseudo_label: PseudoLabelParams
    prototypes: PrototypeParams
    adapt: AdaptParams
    teacher: TeacherParams
    distill: DistillParams
    evaluate: EvaluateParams

    @model_validator(mode="after")
    def _crops_fit(self) -> Params:
        checks = [
            ("warmup.view.crop", self.warmup.view, "source"),
            ("oracle.view.crop", self.oracle.view, "target"),
            ("adapt.view.crop", self.adapt.view, "target"),
            ("distill.view.crop", self.distill.view, "target"),
        ]
        for key, view, domain in checks:
            size = self.data.image_size(domain)
            if size is None:
                continue
            # Views are drawn from the image at view.base_width (aspect kept) when set, else as read.
            max_scale = view.scale_range[1] * (view.base_width / size[1] if view.base_width else 1.0)
            if view.crop[0] > size[0] * max_scale or view.crop[1] > size[1] * max_scale:
                raise ValueError(
                    f"{key}: crop {list(view.crop)} is larger than the {domain} image {list(size)} "
                    f"even at the largest rescale {max_scale}"
                )
        if self.model.feat_dim % min(self.model.gn_groups, self.model.feat_dim):
            raise ValueError(f"model.gn_groups: {self.model.gn_groups} does not divide feat_dim")
        return self


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], path: str | Path = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(Path(path), err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; any problem raises ParamsError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, path)
