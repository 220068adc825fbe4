"""Pseudo-label sets as one zarr group each: written atomically, read lazily by image id.

Layout of a store (zarr v3 group); every array is chunked along the image axis only, ``images_per_chunk``
images per chunk (about ``chunk_mb`` of soft labels, at least one image):

- ``label`` [N, h, w] uint8: argmax class of the probabilities; 255 is reserved for "ignore".
- ``conf``  [N, h, w] float16: max probability (the argmax's probability).
- ``soft``  [N, K, h, w] float16 (or uint8 holding ``round(p * 255)``), only when soft labels are stored.

Several images per chunk: at stride-8 maps of small images a chunk per image made the store mostly zarr
overhead and the writer slower than inference (4.7 KB/image and 0.64x inference at 19x16x32 maps). The writer
therefore keeps incomplete chunks in memory and hands a chunk to zarr only once all its images are there, so
each chunk is written exactly once, by one thread (TOOLING.md: concurrent partial writes into one shard/chunk
silently lose items). Readers keep the last decoded chunk per array, so reading the images of one chunk in
turn decodes it once.

``h, w`` is whatever resolution the caller writes (normally the network's stride-8 output). Attributes record
the image ids, class names, resolution, the SHA-256 of the checkpoint that produced the labels and a free
``extra`` dict, so a consumer can check it got the labels it expects instead of trusting a path.

Atomicity: the writer builds ``<path>.tmp`` and renames it to ``<path>`` only after every image was written,
so a crashed or killed producer never leaves a partial store at ``<path>``.

Quantised soft labels (``soft_dtype="uint8"``) are lossy (|error| <= 1/255 per class, except where ties are
broken, see below); ``label`` is always computed from the full-precision probabilities, and the stored ``soft``
keeps that argmax strictly: a class whose quantised value reaches the argmax's is lowered to one step below it,
so ``soft.argmax() == label`` on every pixel (without this, rounding makes near-ties equal and the argmax of
the stored map could differ from ``label``).
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from pipeline.data.ignore import IGNORE_INDEX

FORMAT_NAME = "proda-pseudo-labels"
FORMAT_VERSION = 1
SOFT_DTYPES = ("float16", "uint8")

# Labels are small and very compressible, so a high level is cheap. For float16 probabilities zstd level 1
# compresses about as well as level 3 at half the CPU time, and the
# writer must keep up with the forward pass. zarr compresses the chunks of one write in a thread pool.
_LABEL_CODEC = ZstdCodec(level=9)
_FLOAT_CODEC = ZstdCodec(level=1)


def tmp_path_for(path: str | Path) -> Path:
    """The sibling directory a writer builds in before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class PseudoLabelWriter:
    """Context manager that writes one pseudo-label store atomically.

    ``write(i, prob)`` / ``write_batch(start, probs)`` take softmax probabilities ([K, h, w] / [B, K, h, w],
    numpy or torch, any device) and derive ``label`` and ``conf`` themselves. The reduction runs where the
    tensor lives (GPU stays GPU); compression and disk writes run in a background thread fed by a bounded
    queue so they overlap the model's next forward pass. An error in that thread is re-raised in the caller
    at the next ``write*`` call or at ``__exit__``.

    On a clean exit every index must have been written, then ``<path>.tmp`` replaces ``<path>`` (an existing
    ``<path>`` is removed only at that moment). On an exception the tmp directory is deleted and the
    exception propagates. A stale ``<path>.tmp`` from a killed run is removed when the next writer starts.
    """

    def __init__(
        self,
        path: str | Path,
        ids: Sequence[str],
        class_names: Sequence[str],
        height: int,
        width: int,
        checkpoint_sha256: str,
        store_soft: bool = True,
        soft_dtype: str = "float16",
        chunk_mb: float = 1.0,
        *,
        extra: dict[str, Any] | None = None,
        background: bool = True,
        queue_size: int = 4,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = tmp_path_for(self.path)
        self.ids = [str(i) for i in ids]
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.height, self.width = int(height), int(width)
        self.checkpoint_sha256 = str(checkpoint_sha256)
        self.store_soft = bool(store_soft)
        self.soft_dtype = soft_dtype
        # Mutable until __exit__: stages may record e.g. timing or the flip-averaging setting here.
        self.extra: dict[str, Any] = dict(extra or {})
        self.background = background
        self.queue_size = queue_size
        if soft_dtype not in SOFT_DTYPES:
            raise ValueError(f"soft_dtype must be one of {SOFT_DTYPES}, got {soft_dtype!r}")
        if not chunk_mb > 0:
            raise ValueError(f"chunk_mb must be > 0, got {chunk_mb}")
        itemsize = np.dtype(soft_dtype if store_soft else "float16").itemsize
        per_image = max(1, self.num_classes * self.height * self.width * itemsize)
        self.images_per_chunk = int(max(1, min(len(self.ids), chunk_mb * 2**20 // per_image)))
        if not 0 < self.num_classes < IGNORE_INDEX:
            raise ValueError(f"need 1..{IGNORE_INDEX - 1} classes ({IGNORE_INDEX} is ignore), got {self.num_classes}")
        if len(set(self.ids)) != len(self.ids):
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})[:5]
            raise ValueError(f"duplicate image ids (lookup is by id): {dup}")
        self._arrays: dict[str, Any] = {}
        self._written = np.zeros(len(self.ids), dtype=bool)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abort = False
        self._open = False
        # Incomplete chunks: chunk index -> (arrays of the chunk's images, filled flags).
        self._pending: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] = {}

    def _attrs(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "ids": self.ids,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "height": self.height,
            "width": self.width,
            "checkpoint_sha256": self.checkpoint_sha256,
            "has_soft": self.store_soft,
            "soft_dtype": self.soft_dtype if self.store_soft else None,
            "images_per_chunk": self.images_per_chunk,
            "ignore_label": IGNORE_INDEX,
            "extra": self.extra,
        }

    def __enter__(self) -> PseudoLabelWriter:
        if self._open:
            raise RuntimeError("PseudoLabelWriter is not reentrant")
        if self.tmp_path.exists() or self.tmp_path.is_symlink():
            _remove(self.tmp_path)  # left by a killed run; never trust its contents
        self.tmp_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            group = zarr.open_group(self.tmp_path, mode="w", zarr_format=3, attributes=self._attrs())
            n, k, h, w = len(self.ids), self.num_classes, self.height, self.width
            self._arrays["label"] = group.create_array(
                "label",
                shape=(n, h, w),
                dtype="uint8",
                chunks=(self.images_per_chunk, h, w),
                compressors=_LABEL_CODEC,
                fill_value=IGNORE_INDEX,
            )
            self._arrays["conf"] = group.create_array(
                "conf",
                shape=(n, h, w),
                dtype="float16",
                chunks=(self.images_per_chunk, h, w),
                compressors=_FLOAT_CODEC,
                fill_value=0.0,
            )
            if self.store_soft:
                self._arrays["soft"] = group.create_array(
                    "soft",
                    shape=(n, k, h, w),
                    dtype=self.soft_dtype,
                    chunks=(self.images_per_chunk, k, h, w),
                    compressors=_FLOAT_CODEC,
                    fill_value=0,
                )
            self._group = group
        except BaseException:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            raise
        self._open = True
        if self.background:
            self._queue = queue.Queue(maxsize=max(1, self.queue_size))
            self._thread = threading.Thread(target=self._worker, name="pseudo-label-writer", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._open = False
        if exc_type is not None:
            self._abort = True  # the worker drops queued items instead of writing them
        try:
            self._stop_worker()
            if exc_type is None:
                self._raise_if_failed()
                if not self._written.all():
                    missing = [self.ids[i] for i in np.flatnonzero(~self._written)[:5]]
                    raise RuntimeError(
                        f"pseudo-label store {self.path}: only {int(self._written.sum())}/{len(self.ids)} "
                        f"images were written; first missing ids: {missing}"
                    )
                self._group.attrs.update(self._attrs())  # picks up changes to self.extra
                if self.path.exists() or self.path.is_symlink():
                    _remove(self.path)
                os.replace(self.tmp_path, self.path)
        except BaseException:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
            raise
        if exc_type is not None:
            shutil.rmtree(self.tmp_path, ignore_errors=True)
        return False

    # -- writing ------------------------------------------------------------------------------------------

    def write(self, index: int, prob: np.ndarray | torch.Tensor) -> None:
        """Store the probabilities [K, h, w] of image ``ids[index]``."""
        self.write_batch(index, torch.as_tensor(prob).unsqueeze(0))

    def write_batch(self, start_index: int, probs: np.ndarray | torch.Tensor) -> None:
        """Store probabilities [B, K, h, w] of images ``ids[start_index : start_index + B]``."""
        if not self._open:
            raise RuntimeError("PseudoLabelWriter.write* must be called inside its `with` block")
        self._raise_if_failed()
        t = torch.as_tensor(probs).detach()
        b = t.shape[0] if t.ndim else 0
        if t.ndim != 4 or tuple(t.shape[1:]) != (self.num_classes, self.height, self.width):
            raise ValueError(
                f"expected probabilities [B, {self.num_classes}, {self.height}, {self.width}], got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"probabilities must be floating point, got {t.dtype}")
        if start_index < 0 or start_index + b > len(self.ids):
            raise IndexError(f"indices {start_index}..{start_index + b - 1} outside 0..{len(self.ids) - 1}")
        label, conf, soft = self._encode(t, start_index)
        for item in self._collect(start_index, {"label": label, "conf": conf, "soft": soft}):
            if self._queue is None:
                self._store(item)
            else:
                self._queue.put(item)

    def _collect(self, start: int, arrays: dict[str, np.ndarray | None]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Copies a batch into its chunks' buffers; returns the chunks it completed as (first index, arrays)."""
        c, n = self.images_per_chunk, len(self.ids)
        done = []
        b = arrays["label"].shape[0]
        i = start
        while i < start + b:
            chunk = i // c
            lo, hi = chunk * c, min(chunk * c + c, n)
            j = min(hi, start + b)
            if chunk not in self._pending:
                bufs = {k: np.empty((hi - lo, *a.shape[1:]), a.dtype) for k, a in arrays.items() if a is not None}
                self._pending[chunk] = (bufs, np.zeros(hi - lo, dtype=bool))
            bufs, filled = self._pending[chunk]
            for k, buf in bufs.items():
                buf[i - lo : j - lo] = arrays[k][i - start : j - start]
            filled[i - lo : j - lo] = True
            self._written[i:j] = True  # received; a chunk left incomplete means images are missing
            if filled.all():
                del self._pending[chunk]
                done.append((lo, bufs))
            i = j
        return done

    def _encode(self, t: torch.Tensor, start_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        with torch.no_grad():
            conf, label = t.max(dim=1)
            # One cheap check on the [B, h, w] maximum catches NaNs from a diverged model and logits passed by
            # mistake, which would otherwise become plausible-looking labels.
            cmax = float(conf.max()) if conf.numel() else 0.0  # max() propagates NaN: one sync suffices
            if not math.isfinite(cmax):
                raise ValueError(f"non-finite probabilities in the batch starting at index {start_index}")
            if cmax > 1.0 + 1e-3:
                raise ValueError(f"max probability {cmax:.3f} > 1 at index {start_index}: logits, not softmax?")
            soft = None
            if self.store_soft:
                if self.soft_dtype == "uint8":
                    q = (t.float() * 255.0).round_().clamp_(0, 255)
                    # Keep the argmax: any other class that rounds up to (or past) the top one goes one step
                    # below it. The top value is >= 255/K > 1, so the step stays >= 0.
                    top = q.gather(1, label.unsqueeze(1))
                    clash = (q >= top) & (
                        torch.arange(q.shape[1], device=q.device).view(1, -1, 1, 1) != label.unsqueeze(1)
                    )
                    soft = torch.where(clash, top - 1, q).to(torch.uint8)
                else:
                    soft = t.to(torch.float16)
                soft = soft.cpu().numpy()
            return label.to(torch.uint8).cpu().numpy(), conf.to(torch.float16).cpu().numpy(), soft

    def _store(self, item: tuple[int, dict[str, np.ndarray]]) -> None:
        start, arrays = item  # whole chunks only (see the module docstring)
        sl = slice(start, start + arrays["label"].shape[0])
        for name, values in arrays.items():
            self._arrays[name][sl] = values

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._abort:
                continue  # keep draining so the producer never blocks on a full queue
            try:
                self._store(item)
            except BaseException as e:  # handed to the main thread
                self._error = e

    def _stop_worker(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self._queue = None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing pseudo-label store {self.path} failed in the writer thread") from (self._error)


class PseudoLabelStore:
    """Read-only access to a store written by :class:`PseudoLabelWriter`, by image id.

    Only the path is pickled and the zarr group is opened on first access in the current process (the
    process id is checked), so an instance created or used before a DataLoader forks its workers is safe in
    them: each worker opens its own handle.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reset()

    def _reset(self) -> None:
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._attrs: dict[str, Any] = {}
        self._index: dict[str, int] = {}
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[int, np.ndarray]] = {}  # array -> (chunk index, its decoded images)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._reset()

    def __repr__(self) -> str:
        return f"PseudoLabelStore({str(self.path)!r})"

    def _ensure_open(self) -> None:
        if self._group is not None and self._pid == os.getpid():
            return
        if self._pid is not None and self._pid != os.getpid():
            self._reset()  # forked: the parent's handle (and maybe a held lock) must not be reused
        with self._lock:
            if self._group is None:
                self._open()

    def _open(self) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"pseudo-label store {self.path} does not exist")
        not_store = f"{self.path} is not a pseudo-label store written by PseudoLabelWriter"
        try:
            group = zarr.open_group(self.path, mode="r")
            attrs = dict(group.attrs)
        except Exception as e:
            raise ValueError(f"{not_store} ({type(e).__name__}: {e})") from e
        if attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{not_store} (format attribute is {attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"pseudo-label store {self.path} has format_version {attrs.get('format_version')}, "
                f"this code reads {FORMAT_VERSION}"
            )
        names = ["label", "conf"] + (["soft"] if attrs["has_soft"] else [])
        try:
            arrays = {name: group[name] for name in names}
        except KeyError as e:
            raise ValueError(f"{not_store} (array {e} is missing)") from e
        n, h, w = len(attrs["ids"]), attrs["height"], attrs["width"]
        if arrays["label"].shape != (n, h, w):
            raise ValueError(f"{not_store} (label shape {arrays['label'].shape} != {(n, h, w)})")
        self._attrs = attrs
        self._arrays = arrays
        self._index = {i: k for k, i in enumerate(attrs["ids"])}
        self._pid = os.getpid()
        self._group = group

    # -- metadata -----------------------------------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        self._ensure_open()
        return self._attrs

    @property
    def ids(self) -> list[str]:
        return list(self.attrs["ids"])

    @property
    def num_classes(self) -> int:
        return int(self.attrs["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def has_soft(self) -> bool:
        return bool(self.attrs["has_soft"])

    @property
    def height(self) -> int:
        return int(self.attrs["height"])

    @property
    def width(self) -> int:
        return int(self.attrs["width"])

    @property
    def checkpoint_sha256(self) -> str:
        return str(self.attrs["checkpoint_sha256"])

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.attrs.get("extra") or {})

    def __len__(self) -> int:
        return len(self.attrs["ids"])

    def __contains__(self, image_id: object) -> bool:
        self._ensure_open()
        return image_id in self._index

    def index_of(self, image_id: str) -> int:
        self._ensure_open()
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in pseudo-label store {self.path}") from None

    # -- data ---------------------------------------------------------------------------------------------

    def get(self, image_id: str, with_soft: bool = True) -> dict[str, np.ndarray]:
        """``label`` uint8 [h, w], ``conf`` float32 [h, w] and, when stored (and ``with_soft``), ``soft``
        float32 [K, h, w]."""
        i = self.index_of(image_id)
        out = {
            "label": self._read("label", i).astype(np.uint8, copy=True),
            "conf": self._read("conf", i).astype(np.float32),
        }
        if with_soft and "soft" in self._arrays:
            soft = self._read("soft", i)
            out["soft"] = soft.astype(np.float32) / 255.0 if soft.dtype == np.uint8 else soft.astype(np.float32)
        return out

    def _read(self, name: str, i: int) -> np.ndarray:
        """Image ``i`` of array ``name``, decoding its chunk only when it is not the one decoded last."""
        arr = self._arrays[name]
        c = arr.chunks[0]
        chunk = i // c
        with self._lock:
            hit = self._cache.get(name)
            if hit is None or hit[0] != chunk:
                hit = (chunk, np.asarray(arr[chunk * c : min(chunk * c + c, arr.shape[0])]))
                self._cache[name] = hit
        return hit[1][i - chunk * c]

    def check_matches(self, ids: Sequence[str], class_names: Sequence[str]) -> None:
        """Raise ValueError saying what differs if this store was not made for this dataset's ids/classes.

        The store may hold more ids than asked for (e.g. a subset of the split is trained on).
        """
        problems = []
        names = self.class_names
        if len(names) != len(class_names):
            problems.append(f"has {len(names)} classes, dataset has {len(class_names)}")
        elif list(names) != list(class_names):
            k = next(k for k, (a, b) in enumerate(zip(names, class_names)) if a != b)
            problems.append(f"class {k} is {names[k]!r}, dataset's is {class_names[k]!r}")
        self._ensure_open()
        missing = [i for i in ids if i not in self._index]
        if missing:
            problems.append(f"lacks {len(missing)} of the dataset's {len(ids)} ids (first: {', '.join(missing[:3])})")
        if problems:
            raise ValueError(f"pseudo-label store {self.path} " + "; ".join(problems))
