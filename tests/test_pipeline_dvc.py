"""The whole DAG through real `dvc repro` in a temporary git + DVC repo with tiny params."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import run, tiny_params, workspace, write_params

DVC = [sys.executable, "-m", "dvc"]


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = workspace(tmp_path_factory.mktemp("dvc") / "repo", tiny_params(), git_dvc=True)
    res = run([*DVC, "repro"], root)
    root.joinpath("first_repro.log").write_text(res.stdout)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first run"], root)
    return root


def test_repro_runs_every_stage(repo: Path) -> None:
    out = repo.joinpath("first_repro.log").read_text()
    stages = ran_stages(out)
    expected = {
        "generate",
        "prepare",
        "warmup",
        "oracle",
        "pseudo_label",
        "prototypes",
        "adapt",
        "teacher@1",
        "distill@1",
        "evaluate",
    }
    assert expected <= stages, out[-2000:]
    for path in [
        "models/warmup/last.pt",
        "models/oracle/last.pt",
        "models/adapt/last.pt",
        "models/adapt/prototypes.pt",
        "models/distill_1/last.pt",
        "models/prototypes.pt",
        "pseudo/warmup.zarr",
        "pseudo/teacher_1.zarr",
        "metrics/evaluate.json",
        "reports/report.md",
        "plots/adapt/train.csv",
    ]:
        assert (repo / path).exists(), path
    # Only rank-0 style outputs; no leftover resume state or temporary stores after success.
    assert not (repo / ".resume" / "adapt").exists()
    assert not list((repo / "pseudo").glob("*.tmp"))


def test_second_repro_runs_nothing(repo: Path) -> None:
    res = run([*DVC, "repro"], repo)
    assert ran_stages(res.stdout) == set(), res.stdout
    status = run([*DVC, "status"], repo)
    assert "up to date" in status.stdout


def test_param_change_reruns_stage_and_descendants_only(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill"]["kd_beta"] = 0.5
    write_params(repo, params)
    status = run([*DVC, "status", "--json"], repo)
    assert set(json.loads(status.stdout)) == {"distill@1"}  # descendants change only once it reruns
    res = run([*DVC, "repro"], repo)
    assert ran_stages(res.stdout) == {"distill@1", "evaluate"}, res.stdout
    assert "distill.kd_beta" in run([*DVC, "params", "diff"], repo).stdout
    diff = json.loads(run([*DVC, "metrics", "diff", "--json"], repo).stdout)
    # The KD term's weight is in the total loss: the final loss of distill@1 must move.
    assert "final_losses.loss" in diff["metrics/distill_1.json"], diff
    run(["git", "checkout", "params.yaml"], repo)


@pytest.mark.parametrize(
    "module, stages",
    [
        ("pipeline/report/render.py", {"evaluate"}),
        ("pipeline/data/synth.py", {"generate"}),
        ("pipeline/maths/losses.py", {"warmup", "oracle", "adapt", "distill@1"}),
    ],
)
def test_code_edit_marks_only_the_stages_that_import_it(repo: Path, module: str, stages: set[str]) -> None:
    run([*DVC, "repro"], repo)  # up to date with the committed params (an earlier test changed one)
    path = repo / module
    path.write_text(path.read_text() + "\n# an edit\n")
    try:
        status = json.loads(run([*DVC, "status", "--json"], repo).stdout)
        assert set(status) == stages, status
    finally:
        run(["git", "checkout", module], repo)
    assert "up to date" in run([*DVC, "status"], repo).stdout
