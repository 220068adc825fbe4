"""Run a pipeline stage as a Prefect flow when a Prefect server answers, as plain Python when none does.

Each stage module passes :meth:`StageRun.for_stage` to ``pipeline.engine.stage.run_stage``, which builds one per
stage process; the engine only knows the small interfaces of ``pipeline.engine.monitor``. Nothing here receives
an output path or writes an artifact, so this module is no code dependency of any stage: editing it reruns
nothing (``tests/test_dvc_deps.py``). What it does, on its own::

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
  answers 200): ``main`` runs inside a flow run named ``<DVC stage> · <experiment or commit>``, tagged
  ``dvc-stage``, ``stage:<name>`` (and ``exp:<name>``), whose parameters are the ``params`` given (the stage's
  own sections). Each ``step`` is a task run (``cache_policy=NO_CACHE``: DVC decides what is stale, Prefect's
  argument hashing would return stale results for changed files), ``print`` goes to the Prefect logs
  (``log_prints=True``), metrics become table artifacts. During training the loop reports through the run's
  ``monitor`` (a :class:`LiveMonitor`): loss lines at the log interval, each evaluation, a progress artifact,
  and a cancel check (flow run set to Cancelling -> ``StageCancelled`` at the next step boundary -> a
  Cancelled flow run). ``bench/bench_prefect_overhead.py`` measures what this costs per stage process.
* **no-server mode** (nothing configured, nothing answering, ``PIPELINE_PREFECT=0``, or a torchrun rank
  other than 0): Prefect is never imported (the import is slow, and a flow without a server would start a
  temporary server). ``main`` and the steps are called directly; metrics are only logged; the monitor does
  nothing.

Limits: a server that goes away in the middle of a stage makes Prefect's client calls fail, which fails the
stage (the monitor's own requests never do). A SIGKILLed stage leaves its flow run "Running" (heartbeats are
off: the flow would wait for the heartbeat thread at exit). ``sys.exit`` inside ``main`` shows as "Crashed"
rather than "Failed": exit after ``run`` returns or raises.
Only the environment and the profile file are read for the API URL, not ``prefect.toml`` or ``.env``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pipeline.engine.monitor import Monitor, PlainRun, StageCancelled, flatten, fmt

T = TypeVar("T")

#: Set to 0/false/off to run every stage without Prefect even when a server answers.
DISABLE_ENV = "PIPELINE_PREFECT"
#: Id of the task run this stage's flow run belongs to as a subflow (set by ``pipeline.orchestration.dag``).
PARENT_ENV = "PIPELINE_PARENT_TASK_RUN"

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


def _auth_headers(profile: Mapping[str, Any]) -> dict[str, str]:
    """Authorization header for the API: Prefect Cloud and auth-protected servers answer 401 without it."""
    if key := _setting("PREFECT_API_KEY", profile):
        return {"Authorization": f"Bearer {key}"}
    if auth := _setting("PREFECT_API_AUTH_STRING", profile):
        return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    return {}


def _open(request: urllib.request.Request, timeout: float) -> Any:
    # A proxy must not answer for a local server: bypass the environment's proxy settings.
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=timeout)


def api_healthy(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> bool:
    """Whether ``<url>/health`` of a Prefect API answers 200 within ``timeout`` seconds."""
    request = urllib.request.Request(f"{url}/health", headers=dict(headers or {}))
    try:
        with _open(request, timeout) as response:
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
    ok = api_healthy(url, timeout, _auth_headers(profile))
    if not ok:
        print(f"Prefect API at {url} did not answer; running without Prefect.", file=sys.stderr, flush=True)
    return url if ok else None


def slug(text: str) -> str:
    """Lowercase letters, digits and dashes only: the form Prefect requires for artifact keys."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "stage"


_prefect: Any = None  # namespace of the Prefect objects we use, imported once on first need


class _NoTraceback:
    """Logging filter: Prefect's engines log a failing task's and flow's traceback (twice, plus Python's own at
    exit). Their one-line messages stay; the stage entry point prints the one traceback when
    ``PIPELINE_TRACEBACK=1`` asks for it."""

    def filter(self, record: Any) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def hide_prefect_tracebacks() -> None:
    """Keep Prefect's run loggers to one-line failure messages (the terminal and the UI alike)."""
    import logging

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in logger.filters):
            logger.addFilter(_NoTraceback())


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
    # Building Prefect's pydantic models creates about 10^6 objects: skip the cyclic GC passes during the
    # import and the final collection of that graph at interpreter exit.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        from prefect import flow, get_client, get_run_logger, task
        from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
        from prefect.cache_policies import NO_CACHE
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.flow_engine import run_flow_sync
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
        from prefect.states import Cancelled, Completed
    finally:
        if gc_was_enabled:
            gc.enable()
    atexit.register(gc.freeze)
    # At exit Prefect's event worker sends the last task-run events and warns "Still processing items" while
    # it does: expected after every short stage, not a problem.
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    hide_prefect_tracebacks()
    _prefect = types.SimpleNamespace(
        flow=flow,
        task=task,
        get_client=get_client,
        get_run_logger=get_run_logger,
        FlowRunContext=FlowRunContext,
        TaskRunContext=TaskRunContext,
        NO_CACHE=NO_CACHE,
        Cancelled=Cancelled,
        Completed=Completed,
        run_flow_sync=run_flow_sync,
        create_table_artifact=create_table_artifact,
        create_markdown_artifact=create_markdown_artifact,
        create_progress_artifact=create_progress_artifact,
        # The heartbeat thread sleeps in 1 s slices and the flow joins it on exit; heartbeats
        # only feed Prefect's optional zombie-run automation. The environment cannot set it to null.
        no_heartbeats=lambda: temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    )
    return _prefect


# ------------------------------------------------------------------------------------------ live training


class LiveMonitor(Monitor):
    """Reports a training stage to its Prefect flow run as it trains.

    Log lines go through Prefect's run logger (sent to the server in the background). The progress
    artifact and the cancel check are one small HTTP request each, made from the training thread at most every
    ``POLL_SECONDS`` (nothing per step).
    """

    POLL_SECONDS = 2.0

    def __init__(self, run: StageRun) -> None:
        self.run = run
        self.logger: Any = None
        self.name = run.name  # the loop's run name (e.g. "distill@1"), set by start
        self.artifact_id: str | None = None
        self.progress = 0.0
        self.sent_progress = -1.0
        self.next_poll = 0.0
        self.cancelled = False

    def _say(self, line: str) -> None:
        if self.logger is not None:
            self.logger.info(line)
        else:
            print(line, flush=True)

    def start(self, name: str, total: int, initial: int) -> None:
        pf = _import_prefect(self.run.api_url)
        self.name = name
        try:
            self.logger = pf.get_run_logger()
        except Exception:  # outside a run context (a plain call of fit): print instead
            self.logger = None
        self.progress = 100.0 * initial / max(total, 1)
        try:
            self.artifact_id = str(
                pf.create_progress_artifact(
                    progress=self.progress,
                    key=f"{self.run.key}-progress",
                    description=f"training progress of {self.run.run_name} (% of {total} iterations)",
                )
            )
        except Exception as exc:  # monitoring must never stop training
            print(f"could not create the progress artifact: {exc}", file=sys.stderr)
        self.sent_progress = self.progress
        self.next_poll = time.monotonic() + self.POLL_SECONDS
        what = f"resuming at iteration {initial}" if initial else "starting"
        self._say(f"[{name}] training: {what} of {total}")

    def train_log(self, step: int, total: int, values: Mapping[str, float]) -> None:
        self.progress = 100.0 * step / max(total, 1)
        parts = " ".join(f"{k}={fmt(v)}" for k, v in values.items())
        self._say(f"[{self.name}] step {step}/{total} {parts}")

    def eval_log(self, step: int, total: int, metrics: Mapping[str, Any]) -> None:
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not k.startswith("_")}
        parts = " ".join(f"{k}={fmt(v)}" for k, v in shown.items())
        self._say(f"[{self.name}] eval at step {step}/{total}: {parts}")

    def stop_requested(self) -> bool:
        if self.cancelled or time.monotonic() < self.next_poll:
            return self.cancelled
        self.next_poll = time.monotonic() + self.POLL_SECONDS
        self._push_progress()
        state = self.run.api_get(f"/flow_runs/{self.run.flow_run_id}")
        if state and state.get("state_type") in ("CANCELLING", "CANCELLED"):
            self.cancelled = True
            self._say(f"[{self.name}] cancel requested: stopping at this step boundary")
        return self.cancelled

    def _push_progress(self) -> None:
        if self.artifact_id and self.progress != self.sent_progress:
            if self.run.api_call("PATCH", f"/artifacts/{self.artifact_id}", {"data": round(self.progress, 2)}):
                self.sent_progress = self.progress

    def finish(self, step: int, total: int) -> None:
        self.progress = 100.0 * step / max(total, 1)
        self._push_progress()


# ------------------------------------------------------------------------------------------- stage runs


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """Short commit of the code run in ``cwd`` (an experiment's baseline under ``dvc exp run``), or None."""
    if rev := os.environ.get("DVC_EXP_BASELINE_REV"):
        return rev[:7]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=7", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


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


class StageRun(PlainRun):
    """One execution of a pipeline stage; a Prefect flow run when a server answers, a plain run otherwise.

    ``name`` is the stage's name (the Prefect flow name: all runs of a stage group under it); the flow run is
    named ``<DVC stage> · <experiment or commit>``. ``params`` become the flow run's parameters: pass the
    stage's own sections (what dvc.yaml declares for it), so the UI shows what an experiment changed.
    The mode is decided here, by :func:`server_available`; ``api_url`` is None in no-server mode.
    """

    def __init__(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, git_commit())
        self.params = dict(params or {})
        self.api_url = server_available()
        self.flow_run_id: str | None = None
        # DVC sets DVC_STAGE (its addressing, e.g. "distill@1") in every stage command, DVC_EXP_NAME under
        # `dvc exp run`: name runs after them so the UI lists them as DVC does.
        stage = os.environ.get("DVC_STAGE") or name
        self.exp = os.environ.get("DVC_EXP_NAME")
        self.run_name = f"{stage} · {self.exp or self.commit or time.strftime('%Y%m%d-%H%M%S')}"
        self.key = slug(stage)  # artifact keys: one series per stage (and foreach item)
        self._headers: dict[str, str] = {}
        if self.api_url:  # the same settings server_available read
            self._headers = _auth_headers(_active_profile() if not os.environ.get("PREFECT_API_URL") else {})

    @classmethod
    def for_stage(cls, stage: str, params_path: Path) -> StageRun:
        """The run of DVC stage ``stage`` (``distill@1``: flow ``distill``), its parameters the sections dvc.yaml
        declares for it: what ``pipeline.engine.stage.run_stage`` takes as its ``runner``."""
        return cls(stage.split("@")[0], params=declared_params(stage, params_path))

    @property
    def server_mode(self) -> bool:
        return self.api_url is not None

    @property
    def tags(self) -> list[str]:
        tags = ["dvc-stage", f"stage:{self.name}"]
        if self.exp:
            tags.append(f"exp:{self.exp}")
        return tags

    def info(self) -> dict[str, str]:
        """What metrics files record about this run: the git commit and, in server mode, the flow run id."""
        out = super().info()
        if self.flow_run_id:
            out["flow_run"] = self.flow_run_id
        return out

    def run(self, main: Callable[[StageRun], T]) -> T:
        """Call ``main(self)``, inside a Prefect flow run in server mode; return its result.

        An exception from ``main`` marks the flow run Failed (``StageCancelled``: Cancelled) and is re-raised
        after the flow run has ended. ``PIPELINE_PARENT_TASK_RUN`` (set by ``pipeline.orchestration.dag``) makes the
        flow run a subflow of that task run.
        """
        if not self.server_mode:
            return main(self)
        pf = _import_prefect(self.api_url)
        outcome: dict[str, Any] = {}

        def stage_flow() -> Any:
            try:
                outcome["result"] = main(self)
            except StageCancelled as exc:
                outcome["error"] = exc
                return pf.Cancelled(message=str(exc))
            except BaseException as exc:
                outcome["error"] = exc
                raise
            return None  # the result stays in this process: nothing to serialise

        wrapped = pf.flow(
            stage_flow,
            name=_BANNED_NAME_CHARS.sub("-", self.name),
            log_prints=True,
            persist_result=False,  # stage outputs are DVC's business; don't pickle them under PREFECT_HOME
            validate_parameters=False,
        )
        # The flow run is created here, not by the call, to give it parameters, tags and a parent task run in
        # one request; the engine then runs that flow run.
        with pf.get_client(sync_client=True) as client:
            flow_run = client.create_flow_run(
                wrapped,
                name=_BANNED_NAME_CHARS.sub("-", self.run_name),
                parameters=self.params,
                tags=self.tags,
                parent_task_run_id=os.environ.get(PARENT_ENV) or None,
            )
        self.flow_run_id = str(flow_run.id)
        self.monitor = LiveMonitor(self)
        try:
            with pf.no_heartbeats():
                state = pf.run_flow_sync(wrapped, flow_run=flow_run, return_type="state")
        finally:
            self.monitor = Monitor()
        if "error" in outcome:
            raise outcome["error"]
        if state.name == "Cancelling":
            # Cancel requested after the work was done (a non-training stage, or a training stage's final
            # evaluation): the server kept Cancelling over Completed and would show it for ever. The stage
            # finished and DVC records it, so say so.
            with pf.get_client(sync_client=True) as client:
                done = pf.Completed(message="cancel requested after the stage had finished its work")
                client.set_flow_run_state(flow_run.id, done, force=True)
        return outcome.get("result")

    def step(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` as step ``name``, a task run in server mode; return its result."""
        if not self.server_mode:
            return super().step(name, fn, *args, **kwargs)
        pf = _import_prefect(self.api_url)
        raised: list[BaseException] = []

        def body(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except StageCancelled as exc:  # a Cancelled task run, not a Failed one
                raised.append(exc)
                return pf.Cancelled(message=str(exc))
            except BaseException as exc:  # re-raised as is below, whatever Prefect makes of it
                raised.append(exc)
                raise

        body.__name__ = getattr(fn, "__name__", name)
        task = pf.task(
            body,
            name=_BANNED_NAME_CHARS.sub("-", name),
            cache_policy=pf.NO_CACHE,
            persist_result=False,
            log_prints=True,
        )
        state = task(*args, return_state=True, **kwargs)
        if raised:
            raise raised[0]
        return state.result()

    def publish_metrics(self, name: str, metrics: Mapping[str, Any]) -> None:
        """Log ``metrics`` in one line and, in server mode, publish them as table artifact ``<stage>-<name>``.

        Nested dicts are flattened to ``outer/inner`` keys.
        """
        super().publish_metrics(name, metrics)
        if self.server_mode:
            self._artifact(name, flatten(metrics), f"{name} metrics of stage {self.run_name}")

    def publish_table(self, name: str, rows: list[dict[str, Any]], description: str) -> None:
        """A table artifact ``<stage>-<name>`` (rows of column -> value) in server mode; nothing otherwise."""
        if self.server_mode:
            pf = _import_prefect(self.api_url)
            pf.create_table_artifact(rows, key=f"{self.key}-{slug(name)}", description=description)

    def publish_markdown(self, name: str, markdown: str, description: str) -> None:
        """A Markdown artifact ``<stage>-<name>`` in server mode; nothing otherwise."""
        if self.server_mode:
            pf = _import_prefect(self.api_url)
            pf.create_markdown_artifact(markdown, key=f"{self.key}-{slug(name)}", description=description)

    def _artifact(self, name: str, values: Mapping[str, Any], description: str) -> None:
        rows = [
            {"name": k, "value": v if isinstance(v, int | float | str | bool | None) else str(v)}
            for k, v in flatten(values).items()
        ]
        self.publish_table(name, rows, description)

    def api_call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One request to the Prefect REST API; the decoded JSON answer, or None on any error (never raises:
        monitoring must not stop a stage)."""
        if not self.api_url:
            return None
        data = json.dumps(body).encode() if body is not None else None
        headers = {**self._headers, **({"Content-Type": "application/json"} if data else {})}
        request = urllib.request.Request(f"{self.api_url}{path}", data=data, headers=headers, method=method)
        try:
            with _open(request, 5) as response:
                raw = response.read()
            return json.loads(raw) if raw else {}
        except (OSError, ValueError):
            return None

    def api_get(self, path: str) -> Any:
        return self.api_call("GET", path)
