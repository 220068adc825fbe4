"""Entry point shared by every stage module: set-up, Prefect flow wrapping, and clean error exits."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.config import Params, ParamsError
from pipeline.data.datasets import DatasetError
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.context import Context, setup
from pipeline.engine.distributed import cleanup
from pipeline.files import write_json
from pipeline.orchestration.flows import TRACEBACK_ENV, StageCancelled, StageRun

# Errors that describe bad input: their message names the file or key, so it is shown without the type.
USER_ERRORS = (ParamsError, DatasetError, CheckpointError, FileNotFoundError, ValueError)

#: Exit status of a stage cancelled from Prefect (non-zero, so DVC does not record it as done).
CANCELLED_EXIT = 130

#: Key under which every metrics file records its run (commit, flow run id): one small string-valued group,
#: so `dvc metrics show`/`exp show` gain at most two columns and numeric diffs are unaffected.
RUN_KEY = "run"


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """Argument parser of a stage module: dvc.yaml's ``cmd`` passes every input and output path."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameter file (default: %(default)s)")
    return ap


def declared_params(stage: str, params_path: str | Path) -> dict[str, Any]:
    """The params sections dvc.yaml declares for ``stage`` (``distill@1`` -> the ``distill`` entry), with their
    values as written in the params file, nested by top-level section (``evaluate.batch_size`` ->
    ``{"evaluate": {"batch_size": 4}}``). These are the flow run's parameters: what an experiment changed.

    Read raw, not validated: a bad value must still show (the validation error fails the flow run). Without a
    dvc.yaml beside the params file (a stage run by hand elsewhere) every section is shown.
    """
    import yaml

    params_path = Path(params_path)
    try:
        values = yaml.safe_load(params_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(values, dict):
        return {}
    try:
        spec = yaml.safe_load((params_path.parent / "dvc.yaml").read_text())["stages"][stage.split("@")[0]]
        keys = (spec["do"] if "foreach" in spec else spec)["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return values
    out: dict[str, Any] = {}
    for key in keys:
        if not isinstance(key, str):  # {other_file: [keys]}: not this params file
            continue
        node: Any = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        target = out
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = node
    return out


def stamp_metrics(paths: Iterable[str | Path], info: dict[str, str]) -> None:
    """Adds ``{"run": info}`` to each metrics JSON the stage wrote (files it did not write are left alone)."""
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            write_json(path, {**data, RUN_KEY: info})


def describe(err: BaseException) -> str:
    """One line for an error: bad-input errors carry their own message, others also their type."""
    text = str(err).strip() or repr(err)
    return text if isinstance(err, USER_ERRORS) else f"{type(err).__name__}: {text}"


def run_stage(
    name: str,
    main: Callable[[Context, Params], dict | None],
    params_path: str | Path = "params.yaml",
    metrics: Iterable[str | Path] = (),
) -> None:
    """Runs `main(ctx, params)` as the stage `name`: a Prefect flow when a server answers, plain Python otherwise.

    `main` takes the sections it declares in dvc.yaml from `params` and hands the library explicit objects.
    A dict returned by `main` is published as the stage's metrics (a Prefect artifact in server mode); the
    metrics files in `metrics` get the run's commit and flow-run id under ``"run"``.

    Everything, parameter validation included, happens inside the flow run, so any failure is a Failed flow
    run. A failure prints one line (``PIPELINE_TRACEBACK=1``: one traceback) and exits 1; a cancel from
    Prefect exits 130 with the resume state kept.
    """
    run = StageRun(name.split("@")[0], params=declared_params(name, params_path))

    def body(_run: StageRun) -> None:
        ctx, params = setup(name, params_path)
        ctx.run = run
        result = main(ctx, params)
        if result:
            ctx.publish("metrics", result)
        if ctx.info.is_main:
            stamp_metrics(metrics, run.info())

    code = 0
    try:
        run.run(body)
    except StageCancelled as err:
        # Exit only after the flow has ended, so Prefect records it as Cancelled/Failed rather than Crashed.
        print(f"{err}; rerun the stage to resume", file=sys.stderr, flush=True)
        code = CANCELLED_EXIT
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV):
            traceback.print_exc()
        hint = "" if os.environ.get(TRACEBACK_ENV) else f"  ({TRACEBACK_ENV}=1 shows the traceback)"
        print(f"[{name}] error: {describe(err)}{hint}", file=sys.stderr, flush=True)
        code = 1
    finally:
        cleanup()
    if code:
        sys.exit(code)
