"""The whole DVC pipeline as one Prefect flow: ``dvc repro --single-item <stage>`` per stage, in DVC's order.

When to use which:

* ``dvc repro`` (or ``dvc exp run``) is the everyday entry point. It needs no server; each stage still
  reports itself to Prefect as its own flow run when a server answers (see :mod:`pipeline.orchestration.flows`).
* ``python -m pipeline.orchestration.dag run`` starts the pipeline from Prefect: one flow run with a task run per
  stage (state, duration, one log line each); each stage's own flow run is a subflow of its task run (the task
  passes its id to the stage process in ``PIPELINE_PARENT_TASK_RUN``), and a stage DVC skips is a Completed
  task run named "Skipped".
  ``python -m pipeline.orchestration.dag serve`` keeps a process serving that flow, so a run can be started (or
  scheduled) from the Prefect UI.

DVC's cache still decides what runs: a stage whose dependencies did not change is a quick no-op (~1 s for
DVC's check). ``--force`` re-runs the selected stages regardless. Both commands need a running server::

    make prefect      # python -m pipeline.orchestration.server --port 4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.states import Completed, State

from pipeline.engine.monitor import TRACEBACK_ENV
from pipeline.orchestration.flows import (
    PARENT_ENV,
    git_commit,
    hide_prefect_tracebacks,
    server_available,
)

TAIL_LINES = 40


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage exited non-zero."""


def stage_order(repo_root: str | os.PathLike[str] = ".") -> list[str]:
    """The DVC repo's pipeline stages, dependencies first; ``foreach`` items appear as ``name@item``.

    Ties are broken by name, so the order is stable across calls. ``.dvc`` files are not stages.
    """
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(os.fspath(repo_root)) as repo:
        # DVC's graph has an edge from each stage to the stages it depends on; reverse it for run order.
        graph = repo.index.graph.reverse(copy=False)

        def address(stage: PipelineStage) -> str:
            # Like stage.addressing, but relative to the repo root rather than the current directory:
            # these names are given to `dvc repro` run in the repo root.
            dvcfile = os.path.relpath(stage.path, repo.root_dir)
            return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"

        ordered = nx.lexicographical_topological_sort(graph, key=lambda s: getattr(s, "name", "") or s.path)
        return [address(s) for s in ordered if isinstance(s, PipelineStage)]


# DVC's closing hints after every `dvc repro`: noise when the orchestrating flow runs one stage at a time.
DVC_HINTS = (
    "Use `dvc push` to send your updates to remote storage.",
    "To track the changes with git, run:",
    "To enable auto staging, run:",
    "git add ",
    "dvc config core.autostage true",
)


def _is_hint(line: str) -> bool:
    return line.strip().startswith(DVC_HINTS)


def repro_stage(
    stage: str, repo_root: str | os.PathLike[str], force: bool = False, env: dict[str, str] | None = None
) -> str:
    """Run ``dvc repro --single-item [--force] <stage>``; "skipped" if DVC's cache was hit, else "ran".

    The stage's output goes to this process's stdout as it comes (a progress bar stays one line), without DVC's
    git/push hints; it is not copied into Prefect logs (the stage's own flow run has them). Raises
    :class:`StageFailed` with the stage name, exit code and the last lines of output (stderr merged into stdout,
    so the error lands in the tail) on a non-zero exit.
    """
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    skipped = False
    out = sys.stdout.buffer
    with subprocess.Popen(
        cmd, cwd=os.fspath(repo_root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    ) as proc:
        assert proc.stdout is not None
        buf, echoed = b"", 0  # bytes of the current line already written out (a progress bar's refreshes)
        while chunk := proc.stdout.read1(65536):
            buf += chunk
            while (end := buf.find(b"\n")) >= 0:
                raw, buf = buf[: end + 1], buf[end + 1 :]
                line = raw.decode(errors="replace").rstrip("\n").rsplit("\r", 1)[-1].rstrip()
                if not _is_hint(line):
                    out.write(raw[echoed:])
                    if line:
                        tail.append(line)
                echoed = 0
                skipped |= "didn't change, skipping" in line
            if b"\r" in buf[echoed:]:  # a progress bar refreshing its line: show it now
                out.write(buf[echoed:])
                echoed = len(buf)
            out.flush()
        if buf[echoed:]:
            out.write(buf[echoed:])
            out.flush()
    if proc.returncode != 0:
        # 130: the stage's own flow run was cancelled (or Ctrl-C); its resume state is kept.
        what = "was cancelled" if proc.returncode == 130 else "failed"
        raise StageFailed(f"DVC stage {stage!r} {what} (exit {proc.returncode}); last output:\n" + "\n".join(tail))
    return "skipped" if skipped else "ran"


@task(name="dvc-repro", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def repro_stage_task(stage: str, repo_root: str, force: bool = False) -> State:
    """One stage as a task run; the stage's own flow run becomes its subflow, and a cache hit is a Completed
    state named "Skipped" (filter on it in the UI)."""
    logger = get_run_logger()
    # The stage process links its flow run to this task run (pipeline.orchestration.flows.PARENT_ENV).
    env = {**os.environ, PARENT_ENV: str(TaskRunContext.get().task_run.id)}
    start = time.perf_counter()
    result = repro_stage(stage, repo_root, force, env)
    seconds = time.perf_counter() - start
    if result == "skipped":
        logger.info(f"{stage}: skipped, DVC's cache is up to date ({seconds:.1f} s)")
        return Completed(name="Skipped", message="DVC cache up to date: nothing to run", data="skipped")
    logger.info(f"{stage}: ran in {seconds:.1f} s")
    return Completed(message=f"ran in {seconds:.1f} s", data="ran")


def _select(order: list[str], stages: list[str] | None) -> list[str]:
    if not stages:
        return order
    # A foreach group name selects all its items ("train" -> "train@gta", "train@synthia").
    picked = [s for s in order if any(s == x or s.startswith(f"{x}@") for x in stages)]
    unknown = [x for x in stages if not any(s == x or s.startswith(f"{x}@") for s in order)]
    if unknown:
        raise ValueError(f"unknown DVC stage(s) {unknown}; stages are {order}")
    return picked


def _run_name() -> str:
    """``dvc-pipeline · <commit of the repo it runs>``, like the stages' own flow runs."""
    from prefect.runtime import flow_run

    root = flow_run.parameters.get("repo_root", ".")
    return f"dvc-pipeline · {git_commit(root) or time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="dvc-pipeline", flow_run_name=_run_name, persist_result=False)
def pipeline_flow(repo_root: str = ".", stages: list[str] | None = None, force: bool = False) -> dict[str, str]:
    """Reproduce the DVC pipeline stage by stage (dependencies first); stop at the first failing stage.

    ``stages`` restricts the run to those stages (still in DVC's order, upstream stages are not added);
    ``force`` re-runs them even if DVC's cache says they are up to date. Returns stage -> "ran"/"skipped".
    """
    root = str(Path(repo_root).resolve())
    results: dict[str, str] = {}
    for stage in _select(stage_order(root), stages):
        state = repro_stage_task(stage, root, force, return_state=True)
        state.result()  # raises StageFailed: the flow stops at the first failing stage
        results[stage] = "skipped" if state.name == "Skipped" else "ran"
    get_run_logger().info("pipeline: " + ", ".join(f"{s}={r}" for s, r in results.items()))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.orchestration.dag", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the pipeline once as a Prefect flow run")
    run_p.add_argument("--stage", action="append", help="only this stage (repeatable; default: all)")
    run_p.add_argument("--force", action="store_true", help="re-run stages even if DVC's cache is up to date")
    serve_p = sub.add_parser("serve", help="serve the flow so runs can be started from the Prefect UI")
    serve_p.add_argument("--name", default="dvc-pipeline", help="deployment name shown in the UI")
    for p in (run_p, serve_p):
        p.add_argument("--repo", default=".", help="DVC repository root (default: current directory)")
    args = ap.parse_args(argv)

    url = server_available(timeout=2.0)
    if url is None:
        print(
            "No Prefect server answers (PREFECT_API_URL unset or not reachable). Start one and point to it:\n"
            "    make prefect    # runs `prefect server start` so that it stays up offline\n"
            "    export PREFECT_API_URL=http://127.0.0.1:4200/api\n"
            "or run the pipeline without Prefect orchestration: dvc repro",
            file=sys.stderr,
        )
        return 2
    # Stage processes inherit this, so their flow runs go to the same server as this one.
    os.environ["PREFECT_API_URL"] = url
    repo = str(Path(args.repo).resolve())
    if not os.environ.get(TRACEBACK_ENV):
        hide_prefect_tracebacks()
    if args.command == "run":
        try:
            pipeline_flow(repo_root=repo, stages=args.stage, force=args.force)
        except (StageFailed, ValueError) as err:  # the flow run is Failed with this message; no traceback
            print(f"pipeline: {err}", file=sys.stderr, flush=True)
            return 1
    else:
        pipeline_flow.serve(name=args.name, parameters={"repo_root": repo})
    return 0


if __name__ == "__main__":
    sys.exit(main())
