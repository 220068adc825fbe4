"""dvc.yaml's code deps are each stage's import closure, and its commands pass every path the stage uses.

The rule for code deps: every module a stage runs is a dep, except the monitoring and orchestration layer
(``pipeline/orchestration/``: the Prefect flow wrapper the stage entry injects, the server, the DAG flow). Those
modules cannot change a stage's outputs, because they receive no output paths and write no artifacts; this file
checks both halves of that rule, so editing them reruns no stage.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
#: Modules that run in a stage process but are no code deps (the rule in the module docstring).
NOT_DEPS = "pipeline/orchestration/"
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


def import_closure(entry: Path, all_modules: bool = False) -> set[str]:
    """Files of pipeline/ and stages/ that running ``entry`` as ``python -m stages.<x>`` executes and that can
    change its outputs: the closure without the orchestration layer (with ``all_modules``: everything)."""
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
    files = {str(p.relative_to(REPO)) for p in seen}
    return files if all_modules else {f for f in files if not f.startswith(NOT_DEPS)}


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


# Calls that write files; none may appear in a module that is not a code dep.
WRITES = {"write_text", "write_bytes", "mkdir", "save", "save_atomic", "dump", "rename", "replace", "unlink", "rmtree"}


def _not_deps_run_by_stages() -> set[str]:
    files = set()
    for _, spec in _stage_specs():
        files |= import_closure(REPO / "stages" / f"{_module_of(spec['cmd'])}.py", all_modules=True)
    return {f for f in files if f.startswith(NOT_DEPS)}


def test_modules_that_are_no_deps_write_no_artifacts() -> None:
    """The first half of the rule: an orchestration module a stage runs opens no file for writing, calls no
    writer, and imports none of the library's writers (pipeline.files)."""
    modules = _not_deps_run_by_stages()
    assert "pipeline/orchestration/flows.py" in modules  # the stage entries do run the Prefect wrapper
    for rel in sorted(modules):
        tree = ast.parse((REPO / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "pipeline.files", f"{rel} imports the artifact writers"
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                assert name not in WRITES, f"{rel}:{node.lineno} calls {name}()"
                if name == "open":
                    modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                    modes += [
                        k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)
                    ]
                    assert not any(set(str(m)) & set("wax+") for m in modes), f"{rel}:{node.lineno} opens for writing"


def test_modules_that_are_no_deps_receive_no_output_paths() -> None:
    """The second half: a stage module hands the orchestration layer nothing from its command line but the
    params file (the runner factory is passed uncalled), and run_stage calls the runner with the stage name and
    the params path only."""
    for name, spec in _stage_specs():
        tree = ast.parse((REPO / "stages" / f"{_module_of(spec['cmd'])}.py").read_text())
        injected = {
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline.orchestration")
            for a in node.names
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func
            while isinstance(callee, ast.Attribute):
                callee = callee.value
            if isinstance(callee, ast.Name) and callee.id in injected:
                raise AssertionError(f"stage '{name}' calls the orchestration layer itself: {ast.unparse(node)}")
    run_stage = next(
        n
        for n in ast.walk(ast.parse((REPO / "pipeline/engine/stage.py").read_text()))
        if isinstance(n, ast.FunctionDef) and n.name == "run_stage"
    )
    calls = [ast.unparse(c) for c in ast.walk(run_stage) if isinstance(c, ast.Call) and ast.unparse(c.func) == "runner"]
    assert calls == ["runner(name, Path(params_path))"]


def _plot_columns(csv: str) -> set[str]:
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    cols: set[str] = set()
    for entry in plots:
        if isinstance(entry, dict):
            for spec in entry.values():
                y = spec.get("y") if isinstance(spec, dict) else None
                if isinstance(y, dict) and csv in y:
                    cols |= set(y[csv]) if isinstance(y[csv], list) else {y[csv]}
    return cols


def test_plot_columns_are_declared_loss_terms() -> None:
    """dvc.yaml's charts of the training curves draw declared terms (each spelled once, in its method) and the
    loop's own columns; a renamed term fails here instead of drawing an empty chart."""
    from pipeline.methods import distill, proda, supervised

    own = {"loss", "lr"}
    declared = {
        "plots/warmup/train.csv": {t.name for t in (supervised.CE, supervised.ADV_G, supervised.ADV_D)},
        "plots/oracle/train.csv": {supervised.CE.name},
        "plots/adapt/train.csv": {t.name for t in proda.TERMS} | set(proda.DIAGNOSTICS),
        "plots/distill_1/train.csv": {t.name for t in distill.TERMS},
    }
    for csv, names in declared.items():
        drawn = _plot_columns(csv)
        assert drawn, f"dvc.yaml draws nothing from {csv}"
        assert drawn <= names | own, f"{csv}: dvc.yaml draws undeclared columns {sorted(drawn - names - own)}"
