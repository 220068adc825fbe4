"""Run a pipeline stage as a Prefect flow when a Prefect server answers, as plain Python when none does.

Stage modules do not use it directly: ``pipeline.orchestration.stage.run_stage`` builds one per stage process and
``Context.step`` forwards to it. What it does, on its own::

    from pipeline.orchestration.flows import StageRun

    def main(run: StageRun) -> None:
        model = run.step("train", train, cfg)            # a Prefect task in server mode
        metrics = run.step("evaluate", evaluate, model)
        run.publish_metrics("val", metrics)              # a Prefect table artifact + one log line

    if __name__ == "__main__":
        StageRun("warmup", params=cfg).run(main)

Why a ``run(main)`` call rather than a ``with`` block: a Prefect 3 flow run is the call of a function
decorated with ``flow``; only that public API gives the run its Completed/Failed state, its logs and its
task graph. ``run(main)`` wraps ``main`` in ``flow(...)`` and calls it with this object.

Modes, decided once per process by :func:`server_available`:

* **server mode** (``PREFECT_API_URL`` or the active Prefect profile names a server whose ``/health``
  answers 200): ``main`` runs inside a flow run named after the DVC stage, each ``step`` is a task run
  (``cache_policy=NO_CACHE``: DVC decides what is stale, Prefect's argument hashing would return stale
  results for changed files), ``print`` goes to the Prefect logs (``log_prints=True``), metrics become
  table artifacts. Overhead (``bench/bench_prefect_overhead.py``, 2-core VM): ~1.9 s CPU per stage process,
  2.3-3 s wall under load; most of it is ``import prefect``.
* **no-server mode** (nothing configured, nothing answering, ``PIPELINE_PREFECT=0``, or a torchrun rank
  other than 0): Prefect is never imported (the import alone costs 1.2-2.5 s, and a flow without a server
  would start a temporary server, 13-23 s). ``main`` and the steps are called directly; metrics are only
  logged. Overhead ~0.1 s.

Limits: a server that goes away in the middle of a stage makes Prefect's client calls fail, which fails the
stage. A SIGKILLed stage leaves its flow run "Running" (heartbeats are off: they cost ~1 s per stage).
``sys.exit`` inside ``main`` shows as "Crashed" rather than "Failed": exit after ``run`` returns or raises.
Only the environment and the profile file are read for the API URL, not ``prefect.toml`` or ``.env``.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Set to 0/false/off to run every stage without Prefect even when a server answers.
DISABLE_ENV = "PIPELINE_PREFECT"

# Prefect rejects these characters in flow and task names.
_BANNED_NAME_CHARS = re.compile(r"[/%&><]")


def _active_profile() -> dict[str, Any]:
    """Settings of the active Prefect profile, read from the profiles file without importing prefect."""
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    name = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profile = data.get("profiles", {}).get(name, {}) if name else {}
    return profile if isinstance(profile, dict) else {}


def _setting(key: str, profile: Mapping[str, Any]) -> str | None:
    # Prefect's own precedence: the environment wins over the profile.
    value = os.environ.get(key) or profile.get(key)
    return str(value) if value else None


def api_healthy(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> bool:
    """Whether ``<url>/health`` of a Prefect API answers 200 within ``timeout`` seconds."""
    request = urllib.request.Request(f"{url}/health", headers=dict(headers or {}))
    try:
        # A proxy must not answer for a local server: bypass the environment's proxy settings.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):  # refused, timed out, HTTP error status, malformed URL
        return False


def server_available(timeout: float = 0.3) -> str | None:
    """The Prefect API URL if a server answers its health check within ``timeout`` seconds, else None.

    Reads ``PREFECT_API_URL`` from the environment or, when unset, from the active profile in
    ``$PREFECT_HOME/profiles.toml``; never imports prefect. ``PIPELINE_PREFECT=0`` forces None, and so does
    a torchrun rank other than 0 (``RANK``).
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() in {"0", "false", "off", "no"}:
        return None
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports: one flow run per stage
        return None
    profile = _active_profile() if not os.environ.get("PREFECT_API_URL") else {}
    url = _setting("PREFECT_API_URL", profile)
    if not url:
        return None
    url = url.rstrip("/")
    headers = {}
    # Prefect Cloud and auth-protected servers answer 401 without these.
    if key := _setting("PREFECT_API_KEY", profile):
        headers["Authorization"] = f"Bearer {key}"
    elif auth := _setting("PREFECT_API_AUTH_STRING", profile):
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    ok = api_healthy(url, timeout, headers)
    if not ok:
        print(f"Prefect API at {url} did not answer; running without Prefect.", file=sys.stderr, flush=True)
    return url if ok else None


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes only: the form Prefect requires for artifact keys."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "stage"


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


_prefect: Any = None  # namespace of the Prefect objects we use, imported once on first need


def _import_prefect(api_url: str | None) -> Any:
    """Import the few Prefect objects we need, configured for the server at ``api_url`` and low overhead."""
    global _prefect
    if _prefect is not None:
        return _prefect
    if not api_url:
        raise RuntimeError("Prefect is only imported in server mode")
    import atexit
    import gc
    import logging
    import types

    os.environ["PREFECT_API_URL"] = api_url  # it may have come from the profile; pin the checked one
    # Never start a temporary server if the configured one disappears; stay offline and quiet.
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Building Prefect's pydantic models creates ~10^6 objects; cyclic GC passes during the import cost
    # ~0.15 s, and the final collection of that graph at interpreter exit ~0.4 s. Skip both.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        from prefect import flow, get_client, task
        from prefect.artifacts import create_table_artifact
        from prefect.cache_policies import NO_CACHE
        from prefect.context import FlowRunContext
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    finally:
        if gc_was_enabled:
            gc.enable()
    atexit.register(gc.freeze)
    # At exit Prefect's event worker sends the last task-run events and warns "Still processing items" while
    # it does: expected after every short stage, not a problem.
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    _prefect = types.SimpleNamespace(
        flow=flow,
        task=task,
        get_client=get_client,
        FlowRunContext=FlowRunContext,
        NO_CACHE=NO_CACHE,
        create_table_artifact=create_table_artifact,
        # The heartbeat thread sleeps in 1 s slices and the flow joins it on exit (~1 s per stage); heartbeats
        # only feed Prefect's optional zombie-run automation. The environment cannot set it to null.
        no_heartbeats=lambda: temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    )
    return _prefect


class StageRun:
    """One execution of a pipeline stage; a Prefect flow run when a server answers.

    ``name`` is the stage's name (the Prefect flow name: all runs of a stage group under it).
    ``params`` are shown with the run: as a table artifact ``<stage>-params`` in server mode.
    The mode is decided here, by :func:`server_available`; ``api_url`` is None in no-server mode.
    """

    def __init__(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.params = dict(params or {})
        self.api_url = server_available()
        # DVC sets DVC_STAGE (its addressing, e.g. "train@gta") in every stage command, DVC_EXP_NAME under
        # `dvc exp run`: name runs after them so the UI lists them as DVC does.
        stage = os.environ.get("DVC_STAGE")
        exp = os.environ.get("DVC_EXP_NAME")
        if stage or exp:
            self.run_name = ":".join(x for x in (exp, stage or name) if x)
        else:
            self.run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.key = slug(stage or name)  # artifact keys: one series per stage (and foreach item)

    @property
    def server_mode(self) -> bool:
        return self.api_url is not None

    def run(self, main: Callable[[StageRun], T]) -> T:
        """Call ``main(self)``, inside a Prefect flow run in server mode; return its result.

        An exception from ``main`` marks the flow run Failed and is re-raised unchanged.
        """
        if not self.server_mode:
            return main(self)
        pf = _import_prefect(self.api_url)

        def stage_flow() -> T:
            self._tag_flow_run(pf)
            # Parameters go to an artifact, not to flow parameters: serialising those imports FastAPI
            # (~0.3 s), and a params dict is not always JSON-able.
            if self.params:
                self._artifact("params", self.params, "Parameters of this stage run")
            return main(self)

        wrapped = pf.flow(
            stage_flow,
            name=_BANNED_NAME_CHARS.sub("-", self.name),
            flow_run_name=lambda: _BANNED_NAME_CHARS.sub("-", self.run_name),  # a str would be .format()-ed
            log_prints=True,
            persist_result=False,  # stage outputs are DVC's business; don't pickle them under PREFECT_HOME
            validate_parameters=False,
        )
        with pf.no_heartbeats():
            return wrapped()

    @staticmethod
    def _tag_flow_run(pf: Any) -> None:
        # Tagged after creation, on the flow run only: a `tags()` context would tag every task run too, and
        # a tagged task run asks the server for tag concurrency slots (~0.4 s for the first task).
        tags = ["dvc-stage"]
        if exp := os.environ.get("DVC_EXP_NAME"):
            tags.append(f"exp:{exp}")
        try:
            with pf.get_client(sync_client=True) as client:
                client.update_flow_run(pf.FlowRunContext.get().flow_run.id, tags=tags)
        except Exception as exc:  # cosmetic: never fail a stage over a tag
            print(f"could not tag the flow run: {exc}", file=sys.stderr)

    def step(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` as step ``name``, a task run in server mode; return its result."""
        if not self.server_mode:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            print(f"[{self.name}] step {name} done in {time.perf_counter() - start:.1f} s", flush=True)
            return result
        pf = _import_prefect(self.api_url)
        task = pf.task(
            fn,
            name=_BANNED_NAME_CHARS.sub("-", name),
            cache_policy=pf.NO_CACHE,
            persist_result=False,
            log_prints=True,
        )
        return task(*args, **kwargs)

    def publish_metrics(self, name: str, metrics: Mapping[str, Any]) -> None:
        """Log ``metrics`` in one line and, in server mode, publish them as table artifact ``<stage>-<name>``.

        Nested dicts are flattened to ``outer/inner`` keys.
        """
        flat = _flatten(metrics)
        print(f"[{self.name}] {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in flat.items()), flush=True)
        if self.server_mode:
            self._artifact(name, flat, f"{name} metrics of stage {self.run_name}")

    def _artifact(self, name: str, values: Mapping[str, Any], description: str) -> None:
        pf = _import_prefect(self.api_url)
        rows = [
            {"name": k, "value": v if isinstance(v, int | float | str | bool | None) else str(v)}
            for k, v in _flatten(values).items()
        ]
        pf.create_table_artifact(rows, key=f"{self.key}-{slug(name)}", description=description)
