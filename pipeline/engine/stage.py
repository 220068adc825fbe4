"""Entry point shared by every stage module: set-up, the run (injected by the stage module), clean error exits.

The stage module passes the runner factory (the Prefect flow wrapper, ``pipeline.orchestration.flows``): this
module and everything it imports are code dependencies of every stage; the runner is not, because it receives
no output paths and writes no artifacts (``tests/test_dvc_deps.py`` states and checks that rule).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.config import Params, ParamsError
from pipeline.data.datasets import DatasetError
from pipeline.distributed import cleanup
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.context import Context, setup
from pipeline.engine.monitor import TRACEBACK_ENV, PlainRun, Runner, StageCancelled
from pipeline.files import write_json

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
    runner: Callable[[str, Path], Runner] | None = None,
) -> None:
    """Runs `main(ctx, params)` as the stage `name` inside the run `runner(name, params_path)` makes (the stage
    module passes the Prefect flow wrapper; without one the stage runs plain, printing its steps).

    `main` takes the sections it declares in dvc.yaml from `params` and hands the library explicit objects.
    A dict returned by `main` is published as the stage's metrics; the metrics files in `metrics` get the
    run's :meth:`Runner.info` (commit, flow-run id) under ``"run"``.

    Everything, parameter validation included, happens inside the run, so any failure is a failed run. A
    failure prints one line (``PIPELINE_TRACEBACK=1``: one traceback) and exits 1; a cancel exits 130 with the
    resume state kept.
    """
    run = runner(name, Path(params_path)) if runner is not None else PlainRun(name.split("@")[0])

    def body(_run: Runner) -> None:
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
        # Exit only after the run has ended, so Prefect records it as Cancelled/Failed rather than Crashed.
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
