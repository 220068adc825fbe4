"""Prefect overhead per stage process: a trivial 2-step stage run through ``StageRun`` vs the same work plain.

Each measurement is a fresh ``python`` process (as under ``dvc repro``), timed from outside. Modes:

* ``no-server-unset``: no ``PREFECT_API_URL`` anywhere (no request is made);
* ``no-server-dead-url``: ``PREFECT_API_URL`` names a localhost port nobody listens on;
* ``server``: a local ``prefect server`` started by this script (``PREFECT_HOME`` in a temp dir).

Overhead = median(stage with StageRun) - median(same work without it), same environment; wall time (what
the requirement is about) and CPU time of the stage process (robust to other load on the machine).

    python bench/bench_prefect_overhead.py results.json [--repeat 7]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORK = """
def add(a, b):
    print("adding", a, b)
    return a + b
"""

STAGE = (
    WORK
    + """
from pipeline.orchestration.flows import StageRun

def main(run):
    x = run.step("first", add, 1, 2)
    y = run.step("second", add, x, 10)
    run.publish_metrics("val", {"miou": 0.5, "acc": 0.9})
    return y

assert StageRun("bench", params={"lr": 0.01}).run(main) == 13
"""
)

BASELINE = (
    WORK
    + """
y = add(add(1, 2), 10)
print("val: miou=0.5, acc=0.9")
assert y == 13
"""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(prefect_home: Path) -> dict[str, str]:
    # Nothing from the caller's Prefect configuration may leak into the measurement.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DVC_"))}
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def start_server(env: dict[str, str], port: int, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        env={**env, "PREFECT_UI_ENABLED": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so stop_server reaches its workers too
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def time_script(path: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one fresh process running ``path``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(path)], env=env, cwd=path.parent, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(mode: str, stage: Path, baseline: Path, env: dict[str, str], repeat: int) -> dict:
    time_script(stage, env)  # warm the page cache and, in server mode, the flow/DB rows
    with_run, without = [], []
    for _ in range(repeat):  # interleaved, so load changes hit both series alike
        with_run.append(time_script(stage, env))
        without.append(time_script(baseline, env))
    wall, cpu = [w for w, _ in with_run], [c for _, c in with_run]
    wall0, cpu0 = [w for w, _ in without], [c for _, c in without]
    med = statistics.median
    return {
        "mode": mode,
        "stage_wall_s": wall,
        "baseline_wall_s": wall0,
        "stage_cpu_s": cpu,
        "baseline_cpu_s": cpu0,
        "overhead_wall_median_s": med(wall) - med(wall0),
        "overhead_wall_min_s": min(wall) - min(wall0),
        # CPU time of the stage process hardly depends on other load on the machine (wall time does).
        "overhead_cpu_median_s": med(cpu) - med(cpu0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="JSON file for the results")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prefect-") as tmp:
        tmp = Path(tmp)
        stage, baseline = tmp / "stage.py", tmp / "baseline.py"
        stage.write_text(STAGE)
        baseline.write_text(BASELINE)
        env = clean_env(tmp / "prefect-home")

        rows.append(measure("no-server-unset", stage, baseline, env, args.repeat))
        dead = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
        rows.append(measure("no-server-dead-url", stage, baseline, dead, args.repeat))

        t0 = time.perf_counter()
        proc, url = start_server(env, free_port())
        server_start_s = time.perf_counter() - t0
        try:
            rows.append(measure("server", stage, baseline, {**env, "PREFECT_API_URL": url}, args.repeat))
        finally:
            stop_server(proc)

    print("overhead per stage process = StageRun stage - same work plain, in seconds")
    print(f"{'mode':<20} {'wall median':>11} {'wall min':>9} {'CPU median':>10}")
    for r in rows:
        print(
            f"{r['mode']:<20} {r['overhead_wall_median_s']:>11.2f} {r['overhead_wall_min_s']:>9.2f} "
            f"{r['overhead_cpu_median_s']:>10.2f}"
        )
    print(f"local prefect server ready after {server_start_s:.1f} s; {args.repeat} runs per cell")
    result = {
        "rows": rows,
        "repeat": args.repeat,
        "server_start_s": server_start_s,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "load_avg_1m_at_end": os.getloadavg()[0],
    }
    try:
        result["prefect"] = importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
