"""What every stage shares: parameter loading, seeding, devices/DDP, datasets from manifests, model files.

Paths between stages are declared in ``dvc.yaml`` and passed explicitly; nothing is found implicitly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import cores
from pipeline.config import DataParams, ModelParams, Params, load_params
from pipeline.data.datasets import LabelMapper, SegDataset, manifest_file, read_manifest
from pipeline.data.labels import class_names
from pipeline.distributed import DistInfo, bf16_native, init_distributed
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.monitor import Monitor, Runner
from pipeline.models import SegModel, build_model


@dataclass
class Context:
    """What every stage shares: its run name, seed, devices/ranks, class names and step runner.

    Stage sections of the parameters and artifact paths are never here: stage modules pass them explicitly.
    """

    stage: str  # run name for logs and resume state, e.g. ``distill@1``
    seed: int
    info: DistInfo
    class_names: list[str]
    # The stage's run (injected by the stage entry: the Prefect flow or a plain run): `ctx.step(name, fn, ...)`.
    run: Runner | None = None
    channels_last: bool = False  # base.channels_last: NHWC weights/activations (faster oneDNN/cuDNN convs)
    sync_bn: bool = False  # base.sync_bn: SyncBatchNorm for BatchNorm that trains under DDP on CUDA

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this rank's device, in the memory format the params ask for."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return model.to(self.info.device, memory_format=fmt)

    @property
    def monitor(self) -> Monitor:
        """What the training loop reports to: the run's monitor (quiet without a run)."""
        return self.run.monitor if self.run is not None else Monitor()

    def step(self, name: str, fn, /, *args, **kwargs):
        return fn(*args, **kwargs) if self.run is None else self.run.step(name, fn, *args, **kwargs)

    def publish(self, name: str, metrics: dict) -> None:
        if self.run is not None and self.info.is_main:
            self.run.publish_metrics(name, metrics)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Data:
    """The prepared datasets: the ``data`` section and the folder of manifests the prepare stage wrote."""

    params: DataParams
    manifests: Path

    def manifest(self, name: str) -> Path:
        """Manifest of a split: ``source``, ``target_train`` or ``target_val``."""
        return manifest_file(self.manifests, name)

    def dataset(self, name: str, with_labels: bool, transform=None) -> SegDataset:
        """Dataset of a split; unlabelled use of the target passes ``with_labels=False`` (labels never read).

        ``resize`` applies to images and training labels; target-val labels keep their stored size, so that
        mIoU is computed at full label resolution (the logits are upsampled to it) whatever the model reads.
        """
        d = self.params
        domain = d.source if name == "source" else d.target
        size = d.image_size("source" if name == "source" else "target")
        mapper = LabelMapper(domain.kind, d.num_classes) if with_labels else None
        size = size if domain.resize else None
        return SegDataset(
            read_manifest(self.manifest(name)), mapper, size, transform, resize_labels=name != "target_val"
        )

    @property
    def num_workers(self) -> int:
        return self.params.num_workers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(stage: str, params_path: str | Path = "params.yaml") -> tuple[Context, Params]:
    """Loads and validates params, sets threads/seeds/determinism, and joins the DDP group under torchrun."""
    params = load_params(params_path)
    info = init_distributed(params.base.device)
    if info.device.type == "cpu":
        cores.join(params.base.threads)  # threads follow the jobs that share the cores (pipeline/cores.py)
    elif params.base.threads:
        torch.set_num_threads(params.base.threads)
    seed_everything(params.base.seed + info.rank)
    if info.device.type == "cpu":
        # Bit-identical CPU runs for a seed (the resume and DDP tests rely on it).
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Fresh heads give tiny gradients; denormal arithmetic made early CPU steps 3-5x slower.
        torch.set_flush_denormal(True)
    if info.is_main and not bf16_native(info.device.type):
        print(f"[{stage}] bf16 autocast off: no native bf16 kernels on this {info.device.type} (amp runs fp32)")
    names = class_names(params.data.num_classes)
    ctx = Context(
        stage, params.base.seed, info, names, channels_last=params.base.channels_last, sync_bn=params.base.sync_bn
    )
    return ctx, params


def new_model(mp: ModelParams, num_classes: int) -> SegModel:
    return build_model(
        mp.backbone,
        num_classes,
        width=mp.width,
        output_stride=mp.output_stride,
        feat_dim=mp.feat_dim,
        head_dilations=tuple(mp.head_dilations),
        dropout=mp.dropout,
        gn_groups=mp.gn_groups,
        se_reduction=mp.se_reduction,
        pretrained=mp.pretrained,
        bn_clr=mp.bn_clr,
    )


def save_model(path: str | Path, model: torch.nn.Module, ctx: Context, mp: ModelParams, extra: dict | None) -> None:
    meta = {
        "stage": ctx.stage,
        "class_names": ctx.class_names,
        "model": mp.model_dump(mode="json"),
        **(extra or {}),
    }
    ckpt.save_atomic(ckpt.model_payload(model.state_dict(), json.loads(json.dumps(meta))), path)


def model_params(meta: dict) -> ModelParams:
    """The architecture a model file declares (its weights are in the file: no pretrained path to reload)."""
    return ModelParams.model_validate({**meta["model"], "pretrained": None})


def read_model(path: str | Path, ctx: Context) -> tuple[SegModel, dict]:
    """Rebuilds a model from its own file (architecture from its metadata), checks the class list, and returns
    it with the file's metadata; the file is read once."""
    data = ckpt.load_model_file(path, ctx.class_names)
    model = new_model(model_params(data["meta"]), ctx.num_classes)
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as err:
        raise ckpt.CheckpointError(f"{path} does not fit its declared architecture: {err}") from None
    return ctx.place(model), data["meta"]


def load_model(path: str | Path, ctx: Context) -> SegModel:
    return read_model(path, ctx)[0]


def model_params_of(path: str | Path) -> ModelParams:
    return model_params(ckpt.load(path)["meta"])
