"""The README's experiment commands, read from the README and run as written in a temporary git + DVC repo.

The workspace is the project with tiny params after a finished `dvc repro` (what `make run` leaves), so the
commands meet what a user's clone holds. The README and this test cannot drift apart: the commands are taken
from the README's "Experiments and the ablation table" section, not copied here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import yaml

from tests.tiny import DVC, REPO, copy_workspace, env, run

# On the pytest-xdist worker that builds the session's finished project (tests/conftest.py) once.
pytestmark = pytest.mark.xdist_group("finished_project")

SECTION = "## Experiments and the ablation table"
TERMINAL_COLUMNS = 120


def readme_blocks(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The commands of each ```bash block of the section, comments stripped, in order."""
    text = readme.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end > 0 else None]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    # A comment starts at "  # " (the commands' own regexes hold no such run).
    return [[line.split("  #")[0].strip() for line in b.splitlines() if line.strip()] for b in blocks]


def display_width(line: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)


def sh(command: str, root: Path, **extra: str) -> subprocess.CompletedProcess:
    """One README line through bash, with the venv first on PATH (as `. .venv/bin/activate` gives)."""
    res = subprocess.run(
        ["bash", "-c", command],
        cwd=root,
        capture_output=True,
        text=True,
        env=env(COLUMNS=str(TERMINAL_COLUMNS), **extra),
        timeout=600,
    )
    assert res.returncode == 0, (
        f"README command failed ({res.returncode}): {command}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


def wait_for_queue(root: Path, command: str, timeout_s: float = 900) -> str:
    """Repeats the README's `dvc queue status` until no experiment is Queued or Running (what the README says)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = sh(command, root).stdout
        if not re.search(r"\b(Queued|Running)\b", out):
            return out
        assert time.monotonic() < deadline, f"queue still busy after {timeout_s} s:\n{out}"
        time.sleep(5)


@pytest.fixture(scope="module")
def finished_run(finished_project: Path, tmp_path_factory) -> Path:
    """A committed project with tiny params, after `dvc repro` and before its results are committed."""
    root = copy_workspace(finished_project, tmp_path_factory.mktemp("readme") / "repo")
    yield root
    # Leave no queue worker behind if a test stopped half-way.
    subprocess.run([*DVC, "queue", "stop", "--kill"], cwd=root, capture_output=True, env=env())


def test_readme_has_the_commands():
    blocks = readme_blocks()
    assert len(blocks) == 2, blocks
    ablation = blocks[0]
    assert sum(c.startswith("dvc exp run --queue") for c in ablation) == 4, ablation
    assert any(c.startswith("dvc queue start") for c in ablation) and "dvc queue status" in ablation
    assert any(c.startswith("dvc exp show") for c in ablation)


@pytest.mark.slow
def test_ablation_commands_run_as_written(finished_run: Path):
    root = finished_run
    commands = readme_blocks()[0]
    names = []
    show = ""
    for command in commands:
        if command == "dvc queue status":
            status = wait_for_queue(root, command)
            names = re.findall(r"-n (\S+)", " ".join(commands))
            for name in names:
                assert re.search(rf"{re.escape(name)}\s+\S+.*\bSuccess\b", status), status
            continue
        res = sh(command, root)
        if command.startswith("dvc exp run --queue"):
            # Queued, not run: the workspace keeps the default (nothing stacks).
            assert "Queued experiment" in res.stdout + res.stderr
            assert "rectify: true" in (root / "params.yaml").read_text()
        if command.startswith("dvc exp show"):
            show = res.stdout
    assert names and show
    lines = show.splitlines()
    # Readable at 120 columns: nothing cut ("…"), every kept column's full name and every experiment shown.
    assert max(display_width(line) for line in lines) <= TERMINAL_COLUMNS, show
    assert "…" not in show, show
    header = next(line for line in lines if "Experiment" in line)
    for column in ("stages.adapt.miou", "stages.distill_1.miou", "gap_closed.adapt", "gap_closed.distill_1"):
        assert column in header, show
    for name in names:
        row = next((line for line in lines if f"[{name}]" in line), None)
        assert row is not None, show
        assert len(re.findall(r"-?\d+(?:\.\d+)?", row.split("]", 1)[1])) == 4, row  # a value in every column
    # Each experiment changed its own switch only: the ablations did not stack.
    params = run(
        [
            *DVC,
            "exp",
            "show",
            "--csv",
            "--drop",
            ".*",
            "--keep",
            r"Experiment|adapt\.(rectify|target_ce\.symmetric|structure_kl\.enabled|regulariser\.enabled)$",
        ],
        root,
    ).stdout
    off = {row.split(",")[0]: row.count("False") for row in params.splitlines()[1:]}
    assert all(off.get(name) == 1 for name in names), params


@pytest.mark.slow
def test_comparison_commands_run_as_written(finished_run: Path):
    root = finished_run
    template = REPO / ".vega" / "dvc_plots.html"
    skipped = []
    for command in readme_blocks()[1]:
        if command.startswith("make plots"):
            if not template.is_file():
                # The JS libraries come from npm (`make plots` installs them); a machine without them skips this.
                skipped.append(command)
                continue
            # The project's venv and the built template, both up to date for make (so nothing is installed here).
            stamp = Path(sys.executable).parents[1] / ".installed"
            if stamp.is_file():
                os.utime(root / "pyproject.toml", (stamp.stat().st_mtime - 1,) * 2)
            for dep in ("pipeline/report/vega/package-lock.json", "pipeline/report/offline_html.py"):
                os.utime(root / dep, (template.stat().st_mtime - 1,) * 2)
            res = sh(command, root, VENV=str(Path(sys.executable).parents[1]), VEGA=str(template.parent))
            page = (root / "dvc_plots" / "index.html").read_text()
            # Offline: no script is loaded from elsewhere; every declared chart is on the page for both revisions.
            assert not re.search(r"<script[^>]+src=", page), "the page loads a script"
            assert "vega-embed" in page and "no-rectify" in page
            assert "WARNING" not in res.stderr and "failed" not in res.stderr.lower(), res.stderr
            continue
        res = sh(command, root)
        if command.startswith("dvc metrics diff"):
            assert "stages.adapt.miou" in res.stdout, res.stdout
        if command.startswith("dvc exp apply"):
            assert "rectify: false" in (root / "params.yaml").read_text()
    if skipped:
        pytest.skip(f"no built vega template ({template}; `make plots` builds it with npm): not run: {skipped}")


METHODS_SECTION = "## Methods side by side"


def method_commands(readme: Path = REPO / "README.md") -> dict[str, list[str]]:
    """Each `dvc exp run -n NAME -S ...` of the methods section (continuation lines joined): NAME -> -S args."""
    import shlex

    text = readme.read_text()
    start = text.index(METHODS_SECTION)
    end = text.find("\n## ", start + len(METHODS_SECTION))
    (block,) = re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.DOTALL)
    commands = [c.split("  #")[0] for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    out = {}
    for command in commands:
        argv = shlex.split(command)
        assert argv[:4] == ["dvc", "exp", "run", "--queue"], command
        out[argv[argv.index("-n") + 1]] = [argv[i + 1] for i, a in enumerate(argv) if a == "-S"]
    return out


def test_methods_commands_are_the_benchmarks_methods(tmp_path: Path):
    """One home per method: the README's command is the benchmark's definition, and it gives valid params."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_methods import METHODS, write_method_params

    from pipeline.config import load_params

    commands = method_commands()
    assert commands == {name: list(m.sets) for name, m in METHODS.items() if m.sets}
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, method in METHODS.items():
        write_method_params(tmp_path, base, method)
        p = load_params(tmp_path / "params.yaml")
        if name == "self-training":
            assert [r.teacher for r in p.distill.rounds.values()] == ["models/warmup", "models/distill_1"]
            assert p.distill.kd_beta == 0.0
        if name == "adaptsegnet":
            assert p.warmup.adversarial.enabled


@pytest.mark.slow
def test_self_training_methods_run_and_rerun_only_what_they_change(finished_run: Path):
    """The README's self-training and CRST lines, run (not queued) one after the other in a finished project:
    each reruns only the stages its change reaches, and the report names the selection of each round."""
    import shlex

    def exp_run(name: str) -> list[str]:
        argv = ["dvc", "exp", "run", "-n", name] + [x for s in method_commands()[name] for x in ("-S", s)]
        return re.findall(r"Running stage '([^']+)'", sh(shlex.join(argv), finished_run).stdout)

    assert exp_run("self-training") == ["teacher@1", "distill@1", "teacher@2", "distill@2", "evaluate"]
    report = json.loads((finished_run / "metrics" / "evaluate.json").read_text())
    assert report["final_stage"] == "distill_2" and report["pseudo_labels"]["teacher_2"]["threshold"] == 0.95
    # CRST over self-training: the same teacher@1 labels, another selection and loss from distill@1 on.
    assert exp_run("crst") == ["distill@1", "teacher@2", "distill@2", "evaluate"]
    report = json.loads((finished_run / "metrics" / "evaluate.json").read_text())
    assert report["pseudo_labels"]["teacher_1"]["selection"] == "class-balanced, portion 0.2"
    assert report["pseudo_labels"]["teacher_2"]["selection"] == "class-balanced, portion 0.25"
    kd = json.loads((finished_run / "metrics" / "distill_2.json").read_text())
    assert kd["selection"]["selection"] == "class_balanced" and kd["selection"]["portion"] == 0.25
    assert set(kd["selection"]["thresholds"]) == set(kd["per_class_iou"])  # one threshold per class, by name
    assert "regulariser" in kd["final_losses"]
