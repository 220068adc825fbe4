"""Helpers shared by the benchmark scripts: params and workspaces, timed `dvc repro`, tables, JSON results."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:  # scripts run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

DVC = [sys.executable, "-m", "dvc"]
# DVC's per-repo site cache, inside each workspace (not the machine's site cache; not a git file).
SITE_CACHE = ".dvc_site"
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


# ------------------------------------------------------------------------------------------- arguments
def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """argparse with the options every script has: --out (JSON) and --params (the params file to run with)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def path(s: str) -> Path:  # resolved at once: a script may chdir into a workspace before using it
        return Path(s).resolve()

    ap.add_argument("--out", type=path, default=RESULTS / f"{name}.json", help="JSON file (default: %(default)s)")
    ap.add_argument(
        "--params",
        type=path,
        default=REPO / "params.yaml",
        metavar="FILE",
        help="params file to run with instead of the repository's params.yaml (the tests pass tiny sizes)",
    )
    return ap


def keep_dir(path: Path | None, name: str) -> Path:
    """A workspace folder kept after the run: the one given, else a new one under the temp dir.

    Never inside the repository: workspaces are git repos of their own, and `git add -A` would embed them.
    """
    if path is not None:
        return path
    return Path(tempfile.mkdtemp(prefix=f"proda-bench-{name}-"))


# -------------------------------------------------------------------------------------- params, workspace
def set_dotted(params: dict, key: str, value: Any) -> None:
    node = params
    *parents, last = key.split(".")
    for k in parents:
        node = node.setdefault(k, {})  # a section the file leaves to its defaults
    node[last] = value


def bench_params(path: Path, overrides: dict[str, Any] | None = None) -> dict:
    """The params file `path` (--params: the repository's params.yaml unless given) with dotted-key overrides."""
    if not path.is_file():
        raise SystemExit(f"--params {path}: no such file")
    params = yaml.safe_load(path.read_text())
    for key, value in (overrides or {}).items():
        set_dotted(params, key, value)
    return params


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``KEY=YAML`` strings -> {dotted key: parsed value}; the value is YAML (numbers, lists, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set needs KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def seed_overrides(seed: int) -> dict[str, int]:
    # One seed drives both the training RNG and the procedural scenes (a different draw of the data).
    return {"base.seed": seed, "data.embedded.seed": seed}


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(root: Path, params: dict) -> Path:
    """The project's code (pipeline/, stages/) and dvc.yaml in root, with these params as its params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root, params)
    return root


def init_repo(root: Path) -> Path:
    """Makes root a git + DVC repo of its own (analytics off, DVC's site cache inside it), all files committed."""

    def call(*cmd: str) -> None:
        res = subprocess.run(cmd, cwd=root, env=bench_env(), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}) in {root}:\n{res.stdout}{res.stderr}")

    call("git", "init", "-q")
    call("git", "config", "user.email", "bench@localhost")
    call("git", "config", "user.name", "bench")
    call(*DVC, "init", "-q")
    call(*DVC, "config", "core.analytics", "false")
    call(*DVC, "config", "core.site_cache_dir", str(root / SITE_CACHE))
    (root / ".gitignore").write_text(f"{SITE_CACHE}/\n.resume/\n__pycache__/\n")
    call("git", "add", "-A")
    call("git", "commit", "-qm", "init")
    return root


def make_workspace(root: Path, params: dict) -> Path:
    """A git + DVC copy of the project (code, dvc.yaml) with these params, committed: what `dvc repro` runs in."""
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists and is not empty; give an empty or new folder")
    return init_repo(copy_project(root, params))


def bench_env() -> dict[str, str]:
    """The caller's environment with this interpreter's bin first (dvc.yaml calls `python`).

    Unbuffered output so `Running stage` lines arrive when they are printed (their timestamps are the data).
    Unlike the tests' env, OMP_NUM_THREADS is left alone: the benchmark should use the machine's cores.
    """
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------ dvc timing
def timed_repro(root: Path, targets: Sequence[str] = (), log: Path | None = None) -> dict[str, Any]:
    """Runs `dvc repro [targets]` in root, timestamping each output line; wall time per stage that ran.

    A stage's time runs from its `Running stage` line to the next one (or the end of the command), so it
    includes DVC's work for that stage (hashing and caching outputs, updating dvc.lock), as a user sees it.
    `dvc_overhead_s` is the rest: start-up, status checks of the stages and the end of the command.
    """
    cmd = [*DVC, "repro", *targets]
    t0 = time.perf_counter()
    events: list[tuple[str, float]] = []
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd, cwd=root, env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if m := STAGE_LINE.search(line):
            events.append((m.group(1), time.perf_counter() - t0))
    rc = proc.wait()
    total = time.perf_counter() - t0
    text = "".join(lines)
    if log is not None:
        log.write_text(text)
    if rc != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({rc}) in {root}:\n{text[-4000:]}")
    ends = [t for _, t in events[1:]] + [total] if events else []
    stages = {name: round(end - start, 3) for (name, start), end in zip(events, ends, strict=True)}
    return {"total_s": round(total, 3), "stages": stages, "dvc_overhead_s": round(total - sum(stages.values()), 3)}


def noop_repro(root: Path, repeat: int, targets: Sequence[str] = ()) -> dict[str, Any]:
    """Wall time of `dvc repro` when nothing changed (median of `repeat`); fails if any stage ran."""
    times = []
    for _ in range(repeat):
        r = timed_repro(root, targets)
        if r["stages"]:
            raise RuntimeError(f"no-op dvc repro ran stages {list(r['stages'])} in {root}")
        times.append(r["total_s"])
    return {"median_s": statistics.median(times), "runs_s": times}


# --------------------------------------------------------------------------------------- output, results
def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def write_result(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Writes results with the date, the machine and the command line; returns what was written."""
    out = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        **results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])])


def mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for one value: there is no spread to estimate)."""
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)
