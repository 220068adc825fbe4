"""The bench/ scripts run on tiny sizes and write their JSON with the expected keys (no timing is asserted).

The tiny sizes reach the scripts as a params file (`--params`); bench/ never imports tests/.
One tiny workspace is shared: bench_pipeline builds it (`dvc repro warmup`, the stages that need no later
model) and bench_pseudo_label reuses its warm-up model. bench_accuracy aggregates evaluate.json files in the
evaluate stage's format (a full tiny `dvc repro` is tested in test_pipeline_dvc.py).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import REPO, run, tiny_params, write_params

COMMON = {"date", "command", "machine"}
slow = pytest.mark.slow  # every test but the import check runs the scripts


def bench(script: str, *args: str) -> str:
    return run([sys.executable, str(REPO / "bench" / f"{script}.py"), *args], REPO).stdout


def result(path: Path, keys: set[str]) -> dict:
    data = json.loads(path.read_text())
    assert COMMON | keys <= set(data), sorted(data)
    assert {"cpu", "cores", "torch", "gpu"} <= set(data["machine"])
    return data


def test_bench_does_not_import_tests() -> None:
    for path in sorted((REPO / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] in ("tests", "tiny", "conftest")], path.name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny params as a file, for the scripts' --params."""
    root = tmp_path_factory.mktemp("tiny-params")
    write_params(root, tiny_params())
    return root / "params.yaml"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny: Path) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "pipeline.json"
    args = f"--workdir {tmp / 'ws'} --until adapt --noop-repeat 1 --prefect-repeat 1 --prefect-modes no-server-unset"
    bench("bench_pipeline", "--params", str(tiny), "--out", str(out), *args.split())
    return tmp / "ws", result(out, {"repro", "noop_repro", "prefect", "workspace"})


@slow
def test_pipeline(pipeline, tiny: Path) -> None:
    _, data = pipeline
    assert {"generate", "prepare", "warmup"} <= set(data["repro"]["stages"])
    assert {"total_s", "dvc_overhead_s"} <= set(data["repro"])
    assert len(data["noop_repro"]["runs_s"]) == 1
    assert data["prefect"]["rows"][0]["mode"] == "no-server-unset"
    assert data["params"] == str(tiny)


@slow
def test_pipeline_reuse(pipeline, tmp_path: Path) -> None:
    """--reuse measures the no-op repro of a finished workspace without running the stages again."""
    ws, _ = pipeline
    out = tmp_path / "reuse.json"
    bench("bench_pipeline", "--reuse", str(ws), "--until", "warmup", "--prefect-repeat", "0", "--out", str(out))
    data = result(out, {"repro", "noop_repro", "workspace"})
    assert data["repro"] is None and data["workspace"] == str(ws.resolve())
    assert len(data["noop_repro"]["runs_s"]) == 3


@slow
def test_pseudo_label(pipeline, tmp_path: Path) -> None:
    ws, _ = pipeline
    out = tmp_path / "pl.json"
    bench("bench_pseudo_label", "--workspace", str(ws), "--repeat", "1", "--out", str(out))
    data = result(out, {"images_per_s", "write_over_inference", "bytes_per_image", "ratio_float32_over_zarr"})
    assert set(data["images_per_s"]) == {"pure_inference", "write_pseudo_labels"}
    assert data["bytes_per_image"]["zarr"]["total"] > 0


def fake_run(root: Path, seed: int, warmup: float, adapt: float, kd: float, oracle: float) -> None:
    """A finished run as the evaluate stage leaves it: params.yaml and metrics/evaluate.json."""
    params = tiny_params(**{"base.seed": seed})
    root.joinpath("metrics").mkdir(parents=True)
    root.joinpath("params.yaml").write_text(yaml.safe_dump(params))
    mious = {"warmup": warmup, "adapt": adapt, "distill_1": kd, "oracle": oracle}
    gap = {n: 100 * (mious[n] - warmup) / (oracle - warmup) for n in ("adapt", "distill_1")}  # percent
    evaluate = {
        "final_stage": "distill_1",
        "gap_closed": gap,
        "pseudo_labels": {"warmup": {"coverage": 100.0, "miou": warmup, "pixel_acc": 50.0, "threshold": 0.0}},
        "stages": {n: {"miou": m, "pixel_acc": 50.0 + m} for n, m in mious.items()},
    }
    root.joinpath("metrics", "evaluate.json").write_text(json.dumps(evaluate, sort_keys=True))


@slow
def test_accuracy_reuse(tmp_path: Path) -> None:
    fake_run(tmp_path / "runs" / "seed_0", 0, 20.0, 25.0, 29.0, 40.0)
    fake_run(tmp_path / "runs" / "seed_1", 1, 22.0, 27.0, 31.0, 42.0)
    out = tmp_path / "acc.json"
    text = bench("bench_accuracy", "--reuse", str(tmp_path / "runs"), "--out", str(out))
    data = result(out, {"runs", "stages", "final_stage", "goal_met", "warmup_aligned", "pseudo_labels"})
    assert list(data["stages"]) == ["warmup", "adapt", "distill_1", "oracle"]
    assert [r["seed"] for r in data["runs"]] == [0, 1]
    kd = data["stages"]["distill_1"]
    assert kd["gap_closed_mean"] == pytest.approx(45.0) and kd["miou_mean"] == pytest.approx(30.0)
    assert data["goal_met"] is False and "NOT met" in text  # goal: 50% of the gap
    assert "gap closed 45.0% (goal >= 50%" in text


@slow
def test_ablation(pipeline, tmp_path: Path) -> None:
    """One variant on the finished tiny run: a copy where `dvc repro adapt` reruns stage 1 only."""
    ws, _ = pipeline
    out = tmp_path / "abl.json"
    args = ["--base", str(ws), "--workdir", str(tmp_path / "w"), "--variants", "no structure KL", "--out", str(out)]
    text = bench("bench_ablation", *args)
    data = result(out, {"rows", "baseline", "runs"})
    assert set(data["rows"]) == {"full stage 1", "no structure KL"} and len(data["rows"]["no structure KL"]) == 1
    assert list(data["runs"][0]["repro"]["stages"]) == ["adapt"]  # nothing upstream reran
    params = yaml.safe_load((tmp_path / "w" / ws.name / "v0" / "params.yaml").read_text())
    assert params["adapt"]["structure_kl"]["enabled"] is False
    assert "no structure KL" in text and "source only" in text


@slow
def test_adapt_cost(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    args = ["--params", str(tiny), "--device", "cpu", "--amp", "off", "--iters", "1", "--warmup", "1"]
    bench("bench_adapt_cost", *args, "--out", str(out))
    data = result(out, {"devices", "rows", "goal_fits_24gib"})
    assert len(data["rows"]) == 2 and not any(r["amp"] for r in data["rows"])
    assert data["params"] == str(tiny) and {r["params"] for r in data["rows"]} == {str(tiny)}
    assert [r["task"] for r in data["rows"]][:2] == ["supervised", "proda"]
    for r in data["rows"]:
        assert not r["oom"] and {"s_per_iter", "peak_extra_mb", "baseline_mb", "overhead_ratio"} <= set(r)
        assert all(v > 0 for v in r["passes_s"].values())
        # The step contains its passes, so it cannot take much less than their sum (timer noise aside).
        assert r["overhead_ratio"] > 0.5
        # CPU peak memory comes from a second process (other allocator settings), merged into the same row.
        assert r["measure"] == "time" and r["peak_rss_mb"] >= r["baseline_mb"] > 0
    assert data["rows"][1]["time_ratio_vs_supervised"] > 0
    passes = data["rows"][1]["passes_s"]
    assert set(passes) == {"student_forward_source", "student_forward_target", "ema_forward", "backward"}


@slow
def test_contention(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "contention.json"
    args = ["--params", str(tiny), "--iters", "1", "--warmup", "1", "--env", "OMP_NUM_THREADS=1"]
    bench("bench_contention", *args, "--out", str(out))
    data = result(out, {"alone_s", "together_s", "together_each_s", "ratio", "env"})
    assert data["env"] == {"OMP_NUM_THREADS": "1"} and len(data["together_each_s"]) == 2
    assert data["alone_s"] > 0 and data["ratio"] == pytest.approx(data["together_s"] / data["alone_s"])


@slow
def test_gpu_check_dry_run(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    text = bench("gpu_check", "--dry-run", "--params", str(tiny), "--out", str(out))
    data = result(out, {"stage1", "ddp", "writer", "dry_run", "params"})
    assert data["dry_run"] and [(r["config"], r["task"]) for r in data["stage1"]] == [
        ("default", "supervised"),
        ("default", "proda"),
    ]
    assert data["params"] == str(tiny) and data["writer"]["soft_map"][1:] == [4, 8]  # tiny 32x64 at stride 8
    assert all(r["overhead_ratio"] > 0 and r["images_per_s"] > 0 for r in data["stage1"])
    # gloo on CPU: the two ranks end with the same weights and prototypes.
    assert data["ddp"]["weights_equal"] and data["ddp"]["prototypes_equal"], data["ddp"]
    assert data["writer"]["writer_over_inference"] > 0 and "writer:" in text


@slow
def test_store_size(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    text = bench("bench_store_size", str(out), "--n", "8")
    data = json.loads(out.read_text())
    assert set(data["sizes"]) == {"default", "paper"} and "x smaller" in text
    for size in data["sizes"].values():
        u8 = size["formats"]["zarr uint8 soft+label+conf"]
        assert u8["soft_argmax_agreement"] == 1.0 and u8["rectified_agreement"] >= 0.999
        assert u8["ratio_vs_float32_npy"] > size["formats"]["zarr float16 soft+label+conf"]["ratio_vs_float32_npy"]


@slow
def test_scaling(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    args = f"--factors 1 2 --until generate --workdir {tmp_path / 'ws'}"
    bench("bench_scaling", "--params", str(tiny), "--out", str(out), *args.split())
    data = result(out, {"factors", "iters", "images", "runs"})
    assert data["images"]["2"]["n_source"] == 2 * data["images"]["1"]["n_source"]
    assert set(data["runs"]) == {"1", "2"} and all("generate" in r["stages"] for r in data["runs"].values())


def test_methods_reuse_table(tmp_path: Path) -> None:
    """bench_methods aggregates each seed's methods: final mIoU, gap closed, final minus that seed's AdaBN warm-up."""
    for seed, (w, st) in enumerate([(20.0, 26.0), (22.0, 30.0)]):
        for method, kd in (("proda", 29.0 + seed), ("self-training", st)):
            run_dir = tmp_path / "methods" / f"seed_{seed}" / "methods" / method
            fake_run(tmp_path / "runs" / f"{seed}-{method}", seed, w, w + 1, kd, 40.0)
            run_dir.mkdir(parents=True)
            (run_dir / "evaluate.json").write_bytes(
                (tmp_path / "runs" / f"{seed}-{method}/metrics/evaluate.json").read_bytes()
            )
    out = tmp_path / "methods.json"
    text = bench("bench_methods", "--reuse", str(tmp_path / "methods"), "--markdown", "--out", str(out))
    data = result(out, {"rows", "per_seed", "methods", "cost_ratio"})
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"proda", "self-training", "cbst", "crst", "adaptsegnet"}
    st = rows["self-training"]
    assert st["miou_per_seed"] == [26.0, 30.0] and st["miou_mean"] == pytest.approx(28.0)
    assert st["final_minus_adabn_warmup"] == [6.0, 8.0]  # against each seed's own warm-up
    assert st["gap_closed_mean"] == pytest.approx((30.0 + 8 / 18 * 100) / 2)
    assert rows["adaptsegnet"]["seeds"] == [] and rows["proda"]["published_gta5_cityscapes"] == 57.5
    assert "self-training" in text and data["cost_ratio"] is None
    assert "| self-training | 21.0 | 28.0 ± 2.8 | 37.2 ± 10.2% | +6.0, +8.0 |  |  |  |" in text
