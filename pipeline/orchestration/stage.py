"""Entry point shared by every stage module: set-up, Prefect flow wrapping, and clean error exits."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Params, ParamsError
from pipeline.data.datasets import DatasetError
from pipeline.engine.checkpoint import CheckpointError
from pipeline.engine.context import Context, setup
from pipeline.engine.distributed import cleanup
from pipeline.orchestration.flows import StageRun

# Errors that describe bad input: shown as one message naming the file or key, without a traceback.
USER_ERRORS = (ParamsError, DatasetError, CheckpointError, FileNotFoundError, ValueError)


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """Argument parser of a stage module: dvc.yaml's ``cmd`` passes every input and output path."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameter file (default: %(default)s)")
    return ap


def run_stage(
    name: str, main: Callable[[Context, Params], dict | None], params_path: str | Path = "params.yaml"
) -> None:
    """Runs `main(ctx, params)` as the stage `name`: a Prefect flow when a server answers, plain Python otherwise.

    `main` takes the sections it declares in dvc.yaml from `params` and hands the library explicit objects.
    A dict returned by `main` is published as the stage's metrics (a Prefect artifact in server mode).
    """
    code = 0
    try:
        ctx, params = setup(name, params_path)
        ctx.run = StageRun(name.split("@")[0], params=params.model_dump(mode="json"))

        def body(_run: StageRun) -> None:
            metrics = main(ctx, params)
            if metrics:
                ctx.publish("metrics", metrics)

        ctx.run.run(body)
    except USER_ERRORS as err:
        if os.environ.get("PIPELINE_TRACEBACK"):
            raise
        # Exit only after the flow has ended, so Prefect records it as Failed rather than Crashed.
        print(f"[{name}] error: {err}  (PIPELINE_TRACEBACK=1 shows the traceback)", file=sys.stderr, flush=True)
        code = 1
    finally:
        cleanup()
    if code:
        sys.exit(code)
