"""The whole DAG through real `dvc repro` in a temporary git + DVC repo with tiny params."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.tiny import DVC, copy_workspace, run, write_params

# `dvc repro` of the whole project; on the pytest-xdist worker that builds the session's finished project once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("finished_project")]


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(finished_project: Path, tmp_path_factory) -> Path:
    """A copy of the session's finished tiny run, its results committed."""
    root = copy_workspace(finished_project, tmp_path_factory.mktemp("dvc") / "repo")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first run"], root)
    return root


def test_repro_runs_every_stage(finished_project: Path, repo: Path) -> None:
    out = finished_project.parent.joinpath("repro.log").read_text()
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
        # Monitoring and orchestration write no artifacts: no stage reruns (tests/test_dvc_deps.py, the rule).
        ("pipeline/orchestration/flows.py", set()),
        ("pipeline/orchestration/dag.py", set()),
        ("pipeline/report/evaluation.py", {"evaluate"}),
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


def _csv_columns(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def declared_plots(root: Path) -> list[tuple[str, Path, str, list[str]]]:
    """(template, csv file, x column, y columns) of every chart in dvc.yaml's top-level plots, folders expanded."""
    out = []
    for entry in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, str):  # an image
            assert (root / entry).is_file(), entry
            continue
        ((plot_id, props),) = entry.items()
        template, x, y = props.get("template", "linear"), props["x"], props["y"]
        if isinstance(y, dict):  # a titled chart over named files
            for file, cols in y.items():
                xcol = x[file] if isinstance(x, dict) else x
                out.append((template, root / file, xcol, [cols] if isinstance(cols, str) else cols))
        else:  # the id is a file or a folder of files that share x and y
            files = sorted((root / plot_id).glob("*.csv")) if (root / plot_id).is_dir() else [root / plot_id]
            assert files, plot_id
            out += [(template, f, x, [y] if isinstance(y, str) else y) for f in files]
    return out


def test_declared_plot_columns_exist_in_the_written_csvs(repo: Path, tmp_path: Path) -> None:
    plots = declared_plots(repo)
    files = {f.relative_to(repo).as_posix() for _, f, _, _ in plots}
    # Every kind of curve a stage writes has a chart.
    for expected in (
        "plots/adapt/train.csv",
        "plots/distill_1/train.csv",
        "plots/warmup/eval.csv",
        "plots/evaluate/miou_by_stage.csv",
        "plots/evaluate/pseudo_labels.csv",
        "plots/evaluate/per_class/adapt.csv",
        "plots/evaluate/per_class/source_only.csv",
    ):
        assert expected in files, (expected, sorted(files))
    for template, file, x, ys in plots:
        assert file.is_file(), file
        header, rows = _csv_columns(file)
        assert rows, file
        assert x in header and set(ys) <= set(header), (file, x, ys, header)
        assert "lr" not in ys, file  # the learning rate is not a loss
        if template == "bar_horizontal":
            # DVC's bar_horizontal draws x as the bar length and y as the category.
            assert all(_number(r[x]) or r[x] == "" for r in rows) and not any(_number(r[ys[0]]) for r in rows), file
        else:
            assert x in ("step", "round"), file  # the CSV's own iteration (or round), not DVC's row index
    # DVC itself finds every declared column and draws every chart.
    res = run([*DVC, "plots", "show", "--json", "-o", str(tmp_path / "plots")], repo)
    assert "could not find" not in res.stderr and "failed" not in res.stderr.lower(), res.stderr
    data = json.loads(res.stdout)["data"]
    titled = [next(iter(e)) for e in yaml.safe_load((repo / "dvc.yaml").read_text())["plots"] if isinstance(e, dict)]
    for plot_id in titled:
        charts = data.get(plot_id) or [c for k, v in data.items() if k.startswith(plot_id + "/") for c in v]
        assert charts, (plot_id, sorted(data))
        for chart in charts:
            assert chart["type"] == "vega" and chart["content"]["data"]["values"], plot_id
