"""Entry point shared by every stage module: set-up, Prefect flow wrapping, and clean error exits."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from pipeline.checkpoint import CheckpointError
from pipeline.config import ParamsError
from pipeline.datasets import DatasetError
from pipeline.distributed import cleanup
from pipeline.flows import StageRun
from pipeline.runtime import Context, setup

# Errors that describe bad input: shown as one message naming the file or key, without a traceback.
USER_ERRORS = (ParamsError, DatasetError, CheckpointError, FileNotFoundError, ValueError)


def run_stage(name: str, main: Callable[[Context], dict | None], params_path: str = "params.yaml") -> None:
    """Runs `main(ctx)` as the stage `name`: a Prefect flow when a server answers, plain Python otherwise.

    A dict returned by `main` is published as the stage's metrics (a Prefect artifact in server mode).
    """
    code = 0
    try:
        ctx = setup(name, params_path)
        ctx.run = StageRun(name.split("@")[0], params=ctx.params.model_dump(mode="json"))

        def body(_run: StageRun) -> None:
            metrics = main(ctx)
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
