"""Pseudo-label store: round trip by id, quantised soft labels, atomicity, dataset checks, worker safety."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal

import numpy as np
import pytest
import torch
import zarr

from pipeline.files import sha256_file
from pipeline.store.pseudo_store import PseudoLabelStore, PseudoLabelWriter, tmp_path_for

K, H, W = 4, 8, 12
IDS = ["aachen/aachen_000000_000019", "bochum/bochum_000000_000313", "zurich/zurich_000001_000019"]
NAMES = ["road", "sidewalk", "building", "car"]


def make_probs(n: int, k: int = K, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(scale=3.0, size=(n, k, H, W)).astype(np.float32)
    return torch.from_numpy(logits).softmax(1).numpy()


def writer(path, ids=IDS, names=NAMES, **kw) -> PseudoLabelWriter:
    return PseudoLabelWriter(path, ids, names, H, W, checkpoint_sha256="ab" * 32, **kw)


def write_store(path, probs, ids=IDS, names=NAMES, **kw) -> None:
    with writer(path, ids, names, **kw) as w:
        w.write_batch(0, probs)


def test_round_trip_by_id(tmp_path):
    probs = make_probs(3)
    path = tmp_path / "pl.zarr"
    with writer(path, extra={"flip": True}) as w:
        w.write(0, probs[0])  # numpy, single image
        w.write_batch(1, torch.from_numpy(probs[1:]))  # torch, batch
        w.extra["seconds"] = 1.5  # changes until exit are recorded
    assert not tmp_path_for(path).exists()
    store = PseudoLabelStore(path)
    assert store.ids == IDS and store.class_names == NAMES and store.num_classes == K
    assert (store.height, store.width, store.has_soft, len(store)) == (H, W, True, 3)
    assert store.checkpoint_sha256 == "ab" * 32 and store.extra == {"flip": True, "seconds": 1.5}
    for i in (2, 0, 1):  # lookup by id, in any order
        rec = store.get(IDS[i])
        assert store.index_of(IDS[i]) == i
        assert rec["label"].dtype == np.uint8 and rec["conf"].dtype == np.float32
        assert rec["soft"].dtype == np.float32 and rec["soft"].shape == (K, H, W)
        np.testing.assert_array_equal(rec["label"], probs[i].argmax(0))
        np.testing.assert_allclose(rec["conf"], probs[i].max(0), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(rec["soft"], probs[i], atol=1e-3)
    with pytest.raises(KeyError, match="not in pseudo-label store"):
        store.index_of("nowhere/x")


def test_no_soft(tmp_path):
    probs = make_probs(3)
    write_store(tmp_path / "s", probs, store_soft=False)
    store = PseudoLabelStore(tmp_path / "s")
    rec = store.get(IDS[1])
    assert not store.has_soft and "soft" not in rec
    np.testing.assert_array_equal(rec["label"], probs[1].argmax(0))


def test_uint8_soft_keeps_the_argmax(tmp_path):
    probs = make_probs(3, seed=1)
    write_store(tmp_path / "q", probs, soft_dtype="uint8")
    store = PseudoLabelStore(tmp_path / "q")
    for i, image_id in enumerate(IDS):
        rec = store.get(image_id)
        np.testing.assert_array_equal(rec["label"], probs[i].argmax(0))  # label comes from full precision
        # Random logits are a harsh case with many near-ties, yet the stored map's argmax is the label's.
        np.testing.assert_array_equal(rec["soft"].argmax(0), rec["label"])
        err = np.abs(rec["soft"] - probs[i])
        # Rounding error, plus one step where a rival class was lowered below the argmax.
        assert err.max() <= 1.5 / 255 + 1e-6
        assert (err > 0.5 / 255 + 1e-6).mean() < 0.01


def test_uint8_tie_is_broken_towards_the_label(tmp_path):
    probs = np.full((3, K, H, W), 0.1, dtype=np.float32)
    probs[:, 0] = 0.35  # class 0 wins by 0.0001: both round to 89
    probs[:, 1] = 0.3499
    probs[:, 2:] = (1 - 0.35 - 0.3499) / (K - 2)
    write_store(tmp_path / "t", probs, soft_dtype="uint8")
    soft = PseudoLabelStore(tmp_path / "t").get(IDS[0])["soft"]
    assert np.all(soft[0] == 89 / 255) and np.all(soft[1] == 88 / 255)


def smooth_probs(n: int, k: int = 19, h: int = 32, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Segmentation-like softmax maps: blobs of classes with soft boundaries (smooth logits plus noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, k, h // 8, w // 8, generator=g) * 12.0
    logits = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return (logits + 0.3 * torch.randn(logits.shape, generator=g)).softmax(1)


def test_uint8_store_leaves_rectification_unchanged(tmp_path):
    from pipeline.maths.prototypes import proto_logits
    from pipeline.maths.selection import rectify

    n, k, h, w = 6, 19, 32, 64
    probs = smooth_probs(n, k, h, w)
    ids = [f"c/c_{i:06d}_000019" for i in range(n)]
    names = [f"c{j}" for j in range(k)]
    with PseudoLabelWriter(tmp_path / "r", ids, names, h, w, "0" * 64, soft_dtype="uint8", chunk_mb=0.02) as wr:
        wr.write_batch(0, probs)
    store = PseudoLabelStore(tmp_path / "r")
    stored = torch.stack([torch.from_numpy(store.get(i)["soft"]) for i in ids])
    g = torch.Generator().manual_seed(1)
    feat, protos = torch.randn(n, 8, h, w, generator=g), torch.randn(k, 8, generator=g)
    omega = proto_logits(feat, protos).softmax(1)
    full, _ = rectify(probs, omega)
    quant, _ = rectify(stored, omega)
    assert (stored.argmax(1) == probs.argmax(1)).all()
    assert (full == quant).float().mean() >= 0.999


@pytest.mark.parametrize("background", [True, False])
def test_several_images_per_chunk_every_item_survives(tmp_path, background):
    # 2 images per chunk; batches that straddle chunks arrive out of order (a chunk is written once, complete).
    n, ids = 7, [f"c/c_{i:06d}_000019" for i in range(7)]
    probs = make_probs(n, seed=3)
    path = tmp_path / "c.zarr"
    per_image = K * H * W * 2  # float16 soft
    with writer(path, ids=ids, chunk_mb=2.5 * per_image / 2**20, background=background, queue_size=1) as w:
        assert w.images_per_chunk == 2
        for start, stop in [(5, 7), (1, 4), (0, 1), (4, 5)]:
            w.write_batch(start, probs[start:stop])
    store = PseudoLabelStore(path)
    assert zarr.open_group(path, mode="r")["soft"].chunks == (2, K, H, W)
    for i in (6, 0, 3, 1, 5, 2, 4):
        rec = store.get(ids[i])
        np.testing.assert_array_equal(rec["label"], probs[i].argmax(0))
        np.testing.assert_allclose(rec["soft"], probs[i], atol=1e-3)


def test_exception_mid_write_leaves_nothing(tmp_path):
    path = tmp_path / "pl.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with writer(path) as w:
            w.write(0, make_probs(1)[0])
            raise RuntimeError("boom")
    assert not path.exists() and not tmp_path_for(path).exists()


def test_incomplete_store_is_not_published(tmp_path):
    path = tmp_path / "pl.zarr"
    with pytest.raises(RuntimeError, match=r"only 2/3 images were written.*zurich"):
        with writer(path) as w:
            w.write_batch(0, make_probs(2))
    assert not path.exists() and not tmp_path_for(path).exists()


def test_writer_thread_error_surfaces(tmp_path):
    class Broken:
        def __setitem__(self, key, value):
            raise OSError("disk full")

    path = tmp_path / "pl.zarr"
    with pytest.raises(RuntimeError, match="writer thread") as info:
        with writer(path) as w:
            w._arrays["conf"] = Broken()
            for i in range(3):
                w.write(i, make_probs(1)[0])
    assert isinstance(info.value.__cause__, OSError)
    assert not path.exists() and not tmp_path_for(path).exists()


def test_bad_inputs_rejected(tmp_path):
    with writer(tmp_path / "x", background=False) as w:
        with pytest.raises(ValueError, match="expected probabilities"):
            w.write(0, np.zeros((K + 1, H, W), np.float32))
        with pytest.raises(ValueError, match="non-finite"):
            w.write(0, np.full((K, H, W), np.nan, np.float32))
        with pytest.raises(ValueError, match="logits"):
            w.write(0, np.full((K, H, W), 3.0, np.float32))
        with pytest.raises(IndexError):
            w.write_batch(2, make_probs(2))
        w.write_batch(0, make_probs(3))
    with pytest.raises(ValueError, match="duplicate"):
        writer(tmp_path / "y", ids=[IDS[0], IDS[0], IDS[1]])


def _write_half_then_die(path: str, probs: np.ndarray) -> None:
    # A forked child must not use the parent's OpenMP pool (it hangs); DataLoader workers do the same.
    torch.set_num_threads(1)
    w = writer(path)
    w.__enter__()
    w.write_batch(0, probs[:1])
    w._stop_worker()  # make sure something reached the disk before dying
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_writer_leaves_nothing_and_next_writer_cleans_tmp(tmp_path):
    path = tmp_path / "pl.zarr"
    probs = make_probs(3)
    proc = mp.get_context("fork").Process(target=_write_half_then_die, args=(str(path), probs))
    proc.start()
    proc.join(60)
    if proc.is_alive():  # never leave a hung child behind
        proc.kill()
        proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not path.exists()
    assert tmp_path_for(path).exists()  # the stale build directory of the killed run
    write_store(path, probs)
    assert not tmp_path_for(path).exists()
    np.testing.assert_array_equal(PseudoLabelStore(path).get(IDS[2])["label"], probs[2].argmax(0))


def test_existing_store_replaced_only_on_success(tmp_path):
    path = tmp_path / "pl.zarr"
    old = make_probs(3, seed=5)
    write_store(path, old)
    with pytest.raises(RuntimeError):
        with writer(path) as w:
            w.write_batch(0, make_probs(3, seed=6))
            raise RuntimeError("crash")
    np.testing.assert_array_equal(PseudoLabelStore(path).get(IDS[0])["label"], old[0].argmax(0))
    new = make_probs(3, seed=7)
    write_store(path, new)
    np.testing.assert_array_equal(PseudoLabelStore(path).get(IDS[0])["label"], new[0].argmax(0))


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        PseudoLabelStore(tmp_path / "missing.zarr").ids
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="plain is not a pseudo-label store"):
        PseudoLabelStore(tmp_path / "plain").ids
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(ValueError, match="other.zarr is not a pseudo-label store"):
        PseudoLabelStore(tmp_path / "other.zarr").ids


def test_store_from_another_dataset_rejected(tmp_path):
    path = tmp_path / "pl.zarr"
    write_store(path, make_probs(3))
    store = PseudoLabelStore(path)
    store.check_matches(IDS[:2], NAMES)  # a subset of the ids is fine
    with pytest.raises(ValueError, match=r"pl.zarr has 4 classes, dataset has 3"):
        store.check_matches(IDS, NAMES[:3])
    with pytest.raises(ValueError, match=r"class 3 is 'car', dataset's is 'truck'"):
        store.check_matches(IDS, NAMES[:3] + ["truck"])
    with pytest.raises(ValueError, match=r"pl.zarr lacks 2 of the dataset's 3 ids \(first: gta/00001, gta/00002"):
        store.check_matches([IDS[0], "gta/00001", "gta/00002"], NAMES)


def test_sha256_file(tmp_path):
    f = tmp_path / "ckpt.pt"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


class _StoreDataset(torch.utils.data.Dataset):
    def __init__(self, store: PseudoLabelStore, ids: list[str]) -> None:
        self.store, self.ids = store, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        rec = self.store.get(self.ids[i])
        return torch.from_numpy(rec["label"]), os.getpid()


def test_pickle_and_forked_dataloader_workers(tmp_path):
    probs = make_probs(3)
    write_store(tmp_path / "pl.zarr", probs)
    store = PseudoLabelStore(tmp_path / "pl.zarr")
    assert store.ids == IDS  # opened in the parent before the workers fork
    clone = pickle.loads(pickle.dumps(store))
    assert clone._group is None and clone.get(IDS[1])["label"].shape == (H, W)
    order = [2, 0, 1, 2]
    loader = torch.utils.data.DataLoader(
        _StoreDataset(store, [IDS[i] for i in order]),
        batch_size=1,
        num_workers=2,
        multiprocessing_context="fork",
    )
    got = list(loader)
    assert {int(pid) for _, pid in got} - {os.getpid()}  # really read in workers
    for (label, _), i in zip(got, order):
        np.testing.assert_array_equal(label[0].numpy(), probs[i].argmax(0))
