"""Entry point shared by every stage module: set-up, Prefect wrapping, and clean error exits."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.checkpoint import CheckpointError
from pipeline.config import ParamsError
from pipeline.datasets import DatasetError
from pipeline.distributed import cleanup
from pipeline.runtime import Context, setup

# Errors that describe bad input: shown as one message naming the file or key, without a traceback.
USER_ERRORS = (ParamsError, DatasetError, CheckpointError, FileNotFoundError)


def run_stage(name: str, main: Callable[[Context], None], params_path: str = "params.yaml") -> None:
    try:
        ctx = setup(name, params_path)
        main(ctx)
    except USER_ERRORS as err:
        print(f"[{name}] error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        cleanup()
