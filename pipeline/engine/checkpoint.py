"""Atomic checkpoint files, loaded with ``weights_only=True``; resume state fingerprinted by its inputs."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline.files import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit; the message names the file."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a sibling temp file, then rename: a kill never leaves a half-written file at `path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns "please file an issue" about foreign pickle protocols
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign file: say which, in one line, without torch's advice
        raise CheckpointError(f"cannot load checkpoint {path}: {unreadable_reason(err)}") from None


def unreadable_reason(err: Exception) -> str:
    """Why torch could not read a file, in a few words. torch's own text for a foreign or corrupt file
    suggests ``weights_only=False`` ("arbitrary code execution") and filing an issue: wrong advice here."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
            return f"not a file written by this pipeline (it holds a Python object, {found.group(1)})"
        return "corrupt, or not a PyTorch checkpoint (unreadable pickle data)"
    if isinstance(err, EOFError) or "central directory" in text or "zip archive" in text:
        return "corrupt or truncated (not a complete PyTorch file)"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def fingerprint(*parts: Any) -> str:
    """Hash of a stage's inputs (params sections, input file hashes) so stale resume state is never used."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def loadable(obj: Any) -> Any:
    """``obj`` with numpy arrays and scalars turned into tensors and Python numbers, recursively: what
    ``weights_only`` loading accepts (a numpy array in resume state made the state unreadable on resume)."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: loadable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(loadable(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_v": 3}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_v"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_payload(state_dict: dict, meta: dict) -> dict:
    """A deployable model file: weights plus what is needed to rebuild and check it."""
    return {"model": state_dict, "meta": meta}


def load_model_file(path: str | Path, expect_classes: list[str] | None = None) -> dict:
    """Loads a model file written by a training stage; checks its class list against the dataset's."""
    ckpt = load(path)
    if "model" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"{path} is not a model file written by this pipeline (no 'model'/'meta')")
    names = ckpt["meta"].get("class_names")
    if expect_classes is not None and names != list(expect_classes):
        raise CheckpointError(
            f"{path} was trained for {len(names or [])} classes {names[:3] if names else []}..., "
            f"the dataset has {len(expect_classes)}"
        )
    return ckpt
