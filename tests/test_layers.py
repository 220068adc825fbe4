"""The library's imports point one way, down: a module imports only its own layer and the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. The zarr store's reader and writer (store/) are data for the engine; the inference that fills
# them (methods/pseudo_labels.py) sits above the engine; monitoring and orchestration sit on top, beside the
# stage entries and the report, and the engine knows them only through pipeline/engine/monitor.py.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("pipeline/__init__.py", "pipeline/files.py", "pipeline/distributed.py", "pipeline/cores.py")),
    ("data", ("pipeline/data/", "pipeline/config.py")),
    ("maths and models", ("pipeline/maths/", "pipeline/models.py")),
    ("store", ("pipeline/store/",)),
    ("engine", ("pipeline/engine/",)),
    ("methods", ("pipeline/methods/",)),
    ("top", ("pipeline/report/", "pipeline/orchestration/", "stages/")),
]


def layer_of(rel: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes):
            return rank
    raise AssertionError(f"{rel} belongs to no layer: add it to LAYERS")


def module_file(name: str) -> str | None:
    for p in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if p.is_file():
            return str(p.relative_to(REPO))
    return None


def imports(path: Path) -> set[str]:
    """Files of the project a module imports (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in ("pipeline", "stages") and (f := module_file(name)):
                out.add(f)
    return out


def test_every_import_points_down() -> None:
    upward = []
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").glob("*.py")]):
        rel = str(path.relative_to(REPO))
        for target in sorted(imports(path)):
            if layer_of(target) > layer_of(rel):
                upward.append(f"{rel} ({LAYERS[layer_of(rel)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert upward == []


def test_the_engine_does_not_know_the_orchestration_layer() -> None:
    """Monitoring is injected: no engine, methods or store module imports pipeline/orchestration/."""
    for sub in ("engine", "methods", "store", "maths", "data"):
        for path in (REPO / "pipeline" / sub).rglob("*.py"):
            assert not any(t.startswith("pipeline/orchestration/") for t in imports(path)), path


def test_layer_check_sees_an_upward_import() -> None:
    """The check itself can fail: a maths module importing the engine is upward."""
    assert layer_of("pipeline/maths/losses.py") < layer_of("pipeline/engine/loop.py")
    assert layer_of("pipeline/store/quality.py") < layer_of("pipeline/methods/pseudo_labels.py")
