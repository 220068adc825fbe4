"""What the engine needs from whoever watches a stage: progress, log lines, a cancel check, named steps.

The engine defines these small interfaces and a plain implementation (prints, never cancels); the stage entry
injects the Prefect one (``pipeline.orchestration.flows.StageRun``). So the engine never imports monitoring
code, and monitoring code, which cannot change a stage's outputs, is not a code dependency of any stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

#: Set (to anything) to see one traceback of a failing stage; without it a failure is one line.
TRACEBACK_ENV = "PIPELINE_TRACEBACK"


class StageCancelled(Exception):
    """The stage's run was cancelled (from the UI or the API); raised at a training step boundary after the
    resume state was written, so a rerun continues from there."""


class Monitor:
    """What the training loop reports while it runs; this base class is the quiet version and does nothing.

    None of these methods may cost anything measurable per step (``stop_requested`` is called every step).
    """

    def start(self, name: str, total: int, initial: int) -> None:
        """Training of ``total`` iterations starts (or resumes) at iteration ``initial``."""

    def train_log(self, step: int, total: int, values: Mapping[str, float]) -> None:
        """Losses, learning rate and throughput at a log interval (``optim.log_every``)."""

    def eval_log(self, step: int, total: int, metrics: Mapping[str, Any]) -> None:
        """A periodic evaluation's metrics."""

    def stop_requested(self) -> bool:
        """Whether the run was cancelled; the loop stops at the step boundary where this turns true."""
        return False

    def finish(self, step: int, total: int) -> None:
        """Training ended (normally, or stopped at ``step``)."""


class Runner(Protocol):
    """One execution of a stage: runs its body, its named steps, and publishes what it measured."""

    monitor: Monitor

    def run(self, main: Callable[[Runner], T]) -> T: ...

    def step(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...

    def publish_metrics(self, name: str, metrics: Mapping[str, Any]) -> None: ...

    def publish_table(self, name: str, rows: list[dict[str, Any]], description: str) -> None: ...

    def publish_markdown(self, name: str, markdown: str, description: str) -> None: ...

    def info(self) -> dict[str, str]: ...


def fmt(value: Any) -> str:
    """A log value: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as one level of ``outer/inner`` keys."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


class PlainRun:
    """A stage run without a monitoring service: steps are called directly and timed, metrics printed."""

    def __init__(self, name: str, commit: str | None = None) -> None:
        self.name = name
        self.commit = commit
        self.monitor = Monitor()

    def run(self, main: Callable[[PlainRun], T]) -> T:
        return main(self)

    def step(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        print(f"[{self.name}] step {name} done in {time.perf_counter() - start:.1f} s", flush=True)
        return result

    def publish_metrics(self, name: str, metrics: Mapping[str, Any]) -> None:
        flat = flatten(metrics)
        print(f"[{self.name}] {name}: " + ", ".join(f"{k}={fmt(v)}" for k, v in flat.items()), flush=True)

    def publish_table(self, name: str, rows: list[dict[str, Any]], description: str) -> None:
        """Tables are for a UI: nothing to show without one."""

    def publish_markdown(self, name: str, markdown: str, description: str) -> None:
        """Markdown is for a UI: nothing to show without one."""

    def info(self) -> dict[str, str]:
        return {"commit": self.commit or "unknown"}
