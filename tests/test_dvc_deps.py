"""dvc.yaml's code deps are each stage's import closure, and its commands pass every path the stage uses."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
SPEC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    for p in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports(path: Path) -> set[str]:
    """Every absolute import of the packages in a file, function-level (lazy) imports included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGES}


def import_closure(entry: Path) -> set[str]:
    """Files of pipeline/ and stages/ that running ``entry`` as ``python -m stages.<x>`` executes."""
    seen: set[Path] = set()
    todo = [entry, REPO / "stages/__init__.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imports(path):
            parts = module.split(".")
            # `import a.b.c` executes a/__init__.py and a/b/__init__.py too.
            todo += [f for i in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:i])))]
    return {str(p.relative_to(REPO)) for p in seen}


def _stage_specs() -> list[tuple[str, dict]]:
    return [(name, spec["do"] if "foreach" in spec else spec) for name, spec in SPEC.items()]


def _module_of(cmd: str) -> str:
    m = re.match(r"python -m stages\.(\w+)\b", cmd)
    assert m, f"stage command does not run a stage module: {cmd}"
    return m.group(1)


@pytest.mark.parametrize("name, spec", _stage_specs(), ids=[n for n, _ in _stage_specs()])
def test_code_deps_are_the_import_closure(name: str, spec: dict) -> None:
    declared = {d for d in spec["deps"] if d.split("/")[0] in PACKAGES}
    want = import_closure(REPO / "stages" / f"{_module_of(spec['cmd'])}.py")
    assert declared == want, (
        f"dvc.yaml stage '{name}': deps missing {sorted(want - declared)}, not imported {sorted(declared - want)}"
    )


def test_closures_keep_stages_apart() -> None:
    """The split that makes the cache useful: the report reruns evaluate only; the renderer generate only."""
    closures = {name: import_closure(REPO / "stages" / f"{_module_of(s['cmd'])}.py") for name, s in _stage_specs()}
    assert {n for n, c in closures.items() if "pipeline/report/render.py" in c} == {"evaluate"}
    assert {n for n, c in closures.items() if "pipeline/data/synth.py" in c} == {"generate"}
    assert {n for n, c in closures.items() if "pipeline/maths/losses.py" in c} == {
        "warmup",
        "oracle",
        "adapt",
        "distill",
    }


def test_no_library_module_writes_a_stage_path() -> None:
    """Artifact folders are named in dvc.yaml only: no pipeline/ module spells one."""
    pattern = re.compile(r"""["'](models|metrics|plots|pseudo|reports|data)/""")
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in sorted((REPO / "pipeline").rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_every_param_section_a_stage_reads_is_declared() -> None:
    """A stage module reads ``params.<section>`` only for sections (or keys) its dvc.yaml entry declares."""
    for name, spec in _stage_specs():
        declared = set(spec.get("params", []))
        source = (REPO / "stages" / f"{_module_of(spec['cmd'])}.py").read_text()
        for section, key in re.findall(r"params\.(\w+)(?:\.(\w+))?", source):
            ok = section in declared or f"{section}.{key}" in declared
            assert ok, f"stage '{name}' reads params.{section}.{key} but declares only {sorted(declared)}"


def test_commands_and_params_agree_with_the_default() -> None:
    """Every round's teacher folder exists as some stage's output (dvc.yaml builds the round stages from it)."""
    p = load_params(REPO / "params.yaml")
    outs = {o for _, s in _stage_specs() for o in s.get("outs", []) if isinstance(o, str)}
    for r, spec in p.distill.rounds.items():
        assert spec.teacher == "models/adapt" or spec.teacher in {o.replace("${key}", str(r - 1)) for o in outs}


def _declared_paths(spec: dict) -> set[str]:
    out: set[str] = set()
    for key in ("deps", "outs", "metrics", "plots"):
        for entry in spec.get(key, []):
            out.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return out


@pytest.mark.parametrize("name, spec", _stage_specs(), ids=[n for n, _ in _stage_specs()])
def test_every_path_a_command_passes_is_declared(name: str, spec: dict) -> None:
    """Each path on a stage's command line is a declared dep or output, a file inside one, or the folder of
    declared files (evaluate's plots and reports are declared file by file)."""
    declared = _declared_paths(spec)
    args = spec["cmd"].split()
    paths = [a for flag, a in zip(args, args[1:]) if flag.startswith("--") and flag != "--round"]
    assert paths, spec["cmd"]
    for path in paths:
        inside = any(path == d or path.startswith(d + "/") or d.startswith(path + "/") for d in declared)
        assert inside, f"stage '{name}': {path} is passed on the command line but not declared"
