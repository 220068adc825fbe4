"""Tiny parameters and workspaces for running the real stages in seconds.

The workspaces are bench/common.py's (tests may use the benchmarks' code; the benchmarks do not use tests/).
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

# The tests import DVC, REPO, SITE_CACHE and write_params from here too.
from bench.common import DVC, REPO, SITE_CACHE, copy_project, init_repo, write_params  # noqa: F401


def _optim(iters: int, **kw: Any) -> dict:
    return {
        "iters": iters,
        "batch_size": 2,
        "optimizer": "sgd",
        "weight_decay": 2e-4,
        "lr": 0.01,
        "head_lr_mult": 1.0,
        "eval_every": 0,
        "ckpt_every": 2,
        "log_every": 1,
        **kw,
    }


VIEW = {"crop": [32, 32], "scale_range": [0.9, 1.1]}

# Overrides of the repository's params.yaml (which writes every knob): tiny sizes, a few iterations.
_TINY_OVERRIDES: dict[str, Any] = {
    "base": {"seed": 0, "device": "cpu", "threads": 1},
    "data": {
        "embedded": {
            "seed": 0,
            "height": 32,
            "width": 64,
            "n_source": 6,
            "n_target_train": 6,
            "n_target_val": 2,
            "source_style": {},
            "target_style": {},
        },
        "source": {"kind": "gta5", "root": "data/embedded/source"},
        "target": {"kind": "cityscapes", "root": "data/embedded/target"},
        "num_classes": 19,
        "num_workers": 0,
    },
    "model": {
        "backbone": "resnet18",
        "width": 8,
        "output_stride": 8,
        "feat_dim": 16,
        "head_dilations": [1, 2, 3, 4],
        "gn_groups": 8,
        "se_reduction": 4,
    },
    "warmup": {"optim": _optim(4), "view": VIEW, "adversarial": {"enabled": False, "ndf": 8}, "target_bn": True},
    "oracle": {"optim": _optim(2), "view": VIEW},
    "pseudo_label": {"batch_size": 4},
    "prototypes": {"min_pixels": 1, "batch_size": 4},
    "adapt": {
        "optim": _optim(3, lr=0.002),
        "view": VIEW,
        "ema_momentum": 0.9,
        "proto_momentum": 0.9,
        "min_pixels": 1,
        "target_bn": True,
    },
    "teacher": {"batch_size": 4},
    "distill": {
        "rounds": {"1": {"teacher": "models/adapt", "student_init": "scratch"}},
        "optim": _optim(2),
        "view": VIEW,
        "conf_threshold": 0.95,
        "kd_beta": 1.0,
        "target_bn": True,
    },
    "evaluate": {"batch_size": 4, "n_overlays": 2},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else copy.deepcopy(v)
    return out


# distill.rounds is replaced, not merged: one round.
_base = yaml.safe_load((REPO / "params.yaml").read_text())
_base["distill"]["rounds"] = {}
TINY: dict[str, Any] = _merge(_base, _TINY_OVERRIDES)


def tiny_params(**overrides: Any) -> dict:
    """TINY with dotted-key overrides, e.g. tiny_params(**{"warmup.optim.iters": 6})."""
    p = copy.deepcopy(TINY)
    for key, value in overrides.items():
        node = p
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = value
    return p


def workspace(root: Path, params: dict | None = None, git_dvc: bool = False) -> Path:
    """A copy of the project (code, dvc.yaml) with tiny params; optionally a committed git + DVC repo."""
    copy_project(root, params or tiny_params())
    return init_repo(root) if git_dvc else root


def env(**extra: str) -> dict[str, str]:
    """The test's environment with this interpreter's bin first, so dvc.yaml's `python` is the venv's."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", **extra}


def run(cmd: list[str], cwd: Path, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    kw.setdefault("env", env())
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def stage_argv(name: str, root: Path = REPO) -> list[str]:
    """The command dvc.yaml runs for stage ``name`` (``distill@1`` for a foreach entry), with this interpreter.

    Tests run stages exactly as DVC does: with the paths dvc.yaml passes.
    """
    base, _, key = name.partition("@")
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][base]
    cmd = spec["do"]["cmd"] if "foreach" in spec else spec["cmd"]
    if key:
        params = yaml.safe_load((root / "params.yaml").read_text())
        item = params["distill"]["rounds"][key]
        cmd = cmd.replace("${key}", key).replace("${item.teacher}", item["teacher"])
    argv = shlex.split(cmd)
    assert argv[0] == "python", cmd
    return [sys.executable, *argv[1:]]


def stage(name: str, root: Path, *args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Runs stage ``name`` in root with dvc.yaml's command (plus ``args``)."""
    return run([*stage_argv(name, root), *args], root, check=check, **kw)


def finished_project(root: Path) -> Path:
    """The project as a user's clone holds it after `make run`: committed with tiny params, `dvc repro` done,
    its results not yet committed. `dvc repro`'s output is kept beside it, in ``root.parent / "repro.log"``."""
    workspace(root, tiny_params(), git_dvc=True)
    # The repository's own ignore rules (DVC's cached outputs are ignored as in a clone).
    with (root / ".gitignore").open("a") as fh:
        fh.write((REPO / ".gitignore").read_text())
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project"], root)
    res = run([*DVC, "repro"], root)
    (root.parent / "repro.log").write_text(res.stdout)
    return root


def copy_workspace(src: Path, dst: Path) -> Path:
    """A copy of a git + DVC workspace that DVC treats as a repo of its own.

    DVC's lock, queue and index state (``.dvc/tmp``) and its site cache are not copied; the copy's site cache
    is its own (``.dvc/config.local`` overrides the source's absolute path, and is not a git file).
    """

    def skip(directory: str, names: list[str]) -> list[str]:
        here = Path(directory)
        return [SITE_CACHE] if here == src else ["tmp"] if here == src / ".dvc" else []

    shutil.copytree(src, dst, symlinks=True, ignore=skip)
    run([*DVC, "config", "--local", "core.site_cache_dir", str(dst / SITE_CACHE)], dst)
    return dst
