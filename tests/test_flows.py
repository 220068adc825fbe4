"""StageRun with and without a Prefect server, and the whole-pipeline flow (orchestration.flows, orchestrate).

Server tests start one real ``prefect server`` for the module (~15-25 s) and query it over its REST API.
They are skipped only when prefect is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.orchestration import flows
from pipeline.orchestration.server import healthy, start_server

REPO = Path(__file__).resolve().parents[1]

needs_prefect = pytest.mark.skipif(importlib.util.find_spec("prefect") is None, reason="prefect not installed")

# A trivial stage: two steps, metrics, an optional failing step; reports what it saw as JSON on stdout.
STAGE_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from pipeline.orchestration.flows import StageRun

def add(a, b):
    print("adding", a, b)
    return a + b

def main(run):
    x = run.step("first", add, 1, 2)
    y = run.step("second", add, x, 10)
    run.publish_metrics("val", {"miou": 0.5, "iou": {"road": 0.9, "car": float("nan")}})
    if "--fail" in sys.argv:
        run.step("boom", lambda: 1 / 0)
    if "--cancel-late" in sys.argv:  # as the UI's Cancel does, once the work is done
        cancel = {"state": {"type": "CANCELLING"}, "force": True}
        run.api_call("POST", f"/flow_runs/{run.flow_run_id}/set_state", cancel)
    return y

result = StageRun("demo", params={"lr": 0.01}).run(main)
print(json.dumps({"result": result, "prefect_imported": "prefect" in sys.modules,
                  "elapsed": time.perf_counter() - t0}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    # The developer's own Prefect/DVC settings must not leak into the tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DVC_"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(REPO),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in DVC stage cmds
    )
    env.update(extra)
    return env


def run_stage(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "stage.py"
    script.write_text(STAGE_SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def api(url: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def poll(fn, timeout: float = 20.0):
    """fn() until it returns something truthy: task runs and logs reach the server asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def flow_runs_named(url: str, name: str) -> list[dict]:
    return api(url, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})


def task_runs_of(url: str, flow_run_id: str) -> list[dict]:
    return api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


# ---------------------------------------------------------------- no server


def test_no_server_runs_plain_functions_fast_without_prefect(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home", PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")  # nobody listens
    start = time.perf_counter()
    proc = run_stage(tmp_path, env)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["result"] == 13
    assert out["prefect_imported"] is False
    assert "adding 1 2" in proc.stdout and "[demo] val: miou=0.5, iou/road=0.9, iou/car=nan" in proc.stdout
    assert "did not answer" in proc.stderr
    print(f"no-server stage process: {wall:.2f} s wall, {out['elapsed']:.2f} s inside")
    assert wall < 5  # the goal is < 2 s; generous for loaded CI machines


def test_no_server_exception_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # no profiles.toml there
    run = flows.StageRun("x")
    assert run.api_url is None
    with pytest.raises(ZeroDivisionError):
        run.run(lambda r: r.step("boom", lambda: 1 / 0))


def test_server_url_read_from_active_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    port = free_port()
    (tmp_path / "profiles.toml").write_text(
        f'active = "dev"\n[profiles.dev]\nPREFECT_API_URL = "http://127.0.0.1:{port}/api"\n'
        '[profiles.other]\nPREFECT_API_URL = "http://127.0.0.1:1/api"\n'
    )
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert flows.server_available() is None  # configured in the profile, but nobody listens
    assert f"127.0.0.1:{port}/api did not answer" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_PROFILE", "other")
    flows.server_available()
    assert "127.0.0.1:1/api did not answer" in capsys.readouterr().err


def test_slug_makes_valid_artifact_keys() -> None:
    assert flows.slug("Train@GTA5_v2") == "train-gta5-v2"
    assert flows.slug("sub/dvc.yaml:eval") == "sub-dvc-yaml-eval"


# ---------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    try:
        # The project's own start-up (the settings `make prefect` uses), without the UI's static files.
        proc = start_server("127.0.0.1", port, home / "server.log", env=clean_env(home, PREFECT_UI_ENABLED="false"))
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield {"url": url, "home": home}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


@pytest.mark.slow
@needs_prefect
def test_make_prefect_starts_a_detached_server_with_analytics_off(tmp_path: Path) -> None:
    """`make prefect`'s command returns once the server answers, leaves it running in its own session, and
    starts it with telemetry off (offline, the telemetry call kills a server started without it)."""
    port = free_port()
    env = clean_env(tmp_path / "home", PREFECT_UI_ENABLED="false")
    del env["PREFECT_SERVER_ANALYTICS_ENABLED"]  # the module must set it itself
    cmd = [sys.executable, "-m", "pipeline.orchestration.server", "--port", str(port), "--log", str(tmp_path / "s.log")]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    pid = int(res.stdout.split("pid ")[1].split(",")[0])
    try:
        assert f"UI: http://127.0.0.1:{port}" in res.stdout
        assert f"export PREFECT_API_URL=http://127.0.0.1:{port}/api" in res.stdout
        assert healthy(f"http://127.0.0.1:{port}/api")  # still up after the command returned
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"PREFECT_SERVER_ANALYTICS_ENABLED=false" in environ
        again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already answers" in again.stdout
    finally:
        os.killpg(pid, signal.SIGTERM)


@pytest.mark.slow
@needs_prefect
def test_server_mode_records_flow_tasks_artifacts_and_logs(server: dict, tmp_path: Path) -> None:
    url = server["url"]
    env = clean_env(server["home"], PREFECT_API_URL=url, DVC_STAGE="demo@ok", DVC_EXP_NAME="exp-ok")
    start = time.perf_counter()
    proc = run_stage(tmp_path, env)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["result"] == 13 and out["prefect_imported"] is True
    print(f"server-mode stage process: {wall:.2f} s wall")

    (run,) = flow_runs_named(url, "demo@ok · exp-ok")  # the DVC stage and the experiment
    assert run["state_type"] == "COMPLETED"
    assert run["tags"] == ["dvc-stage", "stage:demo", "exp:exp-ok"]
    assert run["parameters"] == {"lr": 0.01}  # the parameters given to StageRun, shown as the flow's
    tasks = poll(lambda: [t for t in task_runs_of(url, run["id"]) if t["state_type"] == "COMPLETED"])
    assert sorted(t["name"].rsplit("-", 1)[0] for t in tasks) == ["first", "second"]

    arts = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    by_key = {a["key"]: a for a in arts if a["key"]}
    assert set(by_key) == {"demo-ok-val"}
    data = by_key["demo-ok-val"]["data"]
    rows = json.loads(data) if isinstance(data, str) else data
    assert {"name": "miou", "value": 0.5} in rows and {"name": "iou/car", "value": None} in rows

    def printed_lines() -> list[str]:
        logs = api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}})
        return [entry["message"] for entry in logs if "adding 1 2" in entry["message"]]

    assert poll(printed_lines), "print() inside a step did not reach the Prefect logs"


@pytest.mark.slow
@needs_prefect
def test_server_mode_failing_step_marks_flow_failed(server: dict, tmp_path: Path) -> None:
    url = server["url"]
    env = clean_env(server["home"], PREFECT_API_URL=url, DVC_STAGE="demo@fail", DVC_EXP_NAME="e")
    proc = run_stage(tmp_path, env, "--fail")
    assert proc.returncode != 0
    assert "ZeroDivisionError" in proc.stderr
    # Prefect's engines log no tracebacks of their own: only Python's, of the script's uncaught exception.
    assert proc.stderr.count("Traceback") == 1, proc.stderr
    (run,) = flow_runs_named(url, "demo@fail · e")
    assert run["state_type"] == "FAILED" and "ZeroDivisionError" in run["state"]["message"]
    failed = poll(lambda: [t for t in task_runs_of(url, run["id"]) if t["state_type"] == "FAILED"])
    assert [t["name"].rsplit("-", 1)[0] for t in failed] == ["boom"]


@pytest.mark.slow
@needs_prefect
def test_cancel_after_the_work_is_done_completes(server: dict, tmp_path: Path) -> None:
    """Prefect keeps a Cancelling run Cancelling when its flow returns; a stage that finished is Completed."""
    url = server["url"]
    env = clean_env(server["home"], PREFECT_API_URL=url, DVC_STAGE="demo@late", DVC_EXP_NAME="e")
    proc = run_stage(tmp_path, env, "--cancel-late")
    assert proc.returncode == 0, proc.stderr
    (run,) = flow_runs_named(url, "demo@late · e")
    assert run["state_type"] == "COMPLETED" and "after the stage had finished" in run["state"]["message"]


@pytest.mark.slow
@needs_prefect
def test_server_available_finds_live_server(server: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", server["url"] + "/")
    assert flows.server_available() == server["url"]
    monkeypatch.delenv("PREFECT_API_URL")
    (tmp_path / "profiles.toml").write_text(f'active = "s"\n[profiles.s]\nPREFECT_API_URL = "{server["url"]}"\n')
    assert flows.server_available() == server["url"]
    monkeypatch.setenv("RANK", "1")  # torchrun worker: rank 0 alone reports the stage
    assert flows.server_available() is None
    monkeypatch.setenv("RANK", "0")
    assert flows.server_available() == server["url"]
    monkeypatch.setenv(flows.DISABLE_ENV, "0")  # explicit opt-out wins
    assert flows.server_available() is None


# ---------------------------------------------------------------- whole pipeline

DVC_YAML = """\
stages:
  c:
    foreach: [x]
    do:
      cmd: python -c "open('c_${item}.txt', 'w').write(open('b.txt').read() + '${item}')"
      deps: [b.txt]
      outs:
        - c_${item}.txt
  b:
    cmd: python b_stage.py
    deps: [a.txt, b_stage.py]
    outs: [b.txt]
  a:
    cmd: python a_stage.py
    deps: [a_stage.py]
    outs: [a.txt]
"""

# A stage with a progress bar: 200 refreshes of one terminal line.
A_STAGE = """\
import sys
for i in range(200):
    sys.stderr.write(f"\\rprogress {i + 1}/200")
    sys.stderr.flush()
sys.stderr.write("\\n")
open("a.txt", "w").write("a")
"""

B_STAGE = """\
from pipeline.orchestration.flows import StageRun

def main(run):
    text = run.step("read", lambda: open("a.txt").read())
    run.step("write", lambda t: open("b.txt", "w").write(t + "b"), text)
    run.publish_metrics("size", {"chars": len(text) + 1})

StageRun("b").run(main)
"""


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("dvc-repo")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    with Repo.init(str(root)) as repo:  # in-process: ~1 s faster than `dvc init`
        with repo.config.edit() as conf:
            # Keep DVC's per-repo state out of the shared site cache dir.
            conf["core"]["site_cache_dir"] = str(root.parent / f"{root.name}-site-cache")
            conf["core"]["analytics"] = False
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "b_stage.py").write_text(B_STAGE)
    (root / "a_stage.py").write_text(A_STAGE)
    return root


def test_stage_order_is_topological(dvc_repo: Path) -> None:
    from pipeline.orchestration.dag import stage_order

    assert stage_order(dvc_repo) == ["a", "b", "c@x"]


def failing_stage_repo(root: Path) -> None:
    """A git + DVC repo whose one stage, `bad`, exits with the message 'disk on fire'."""
    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q", str(root)], check=True)
    with Repo.init(str(root)) as repo:
        with repo.config.edit() as conf:
            conf["core"]["site_cache_dir"] = str(root / "site-cache")
    (root / "dvc.yaml").write_text(
        "stages:\n  bad:\n    cmd: python -c \"import sys; sys.exit('disk on fire')\"\n    outs: [never.txt]\n"
    )


@pytest.mark.slow
def test_repro_stage_failure_names_stage_and_tail(tmp_path: Path) -> None:
    from pipeline.orchestration.dag import StageFailed, repro_stage

    failing_stage_repo(tmp_path)
    with pytest.raises(StageFailed) as err:
        repro_stage("bad", tmp_path)
    assert "'bad'" in str(err.value) and "disk on fire" in str(err.value)


def test_orchestrate_without_server_explains(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from pipeline.orchestration.dag import main

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    assert main(["run"]) == 2
    assert "prefect server start" in capsys.readouterr().err


@pytest.mark.slow
@needs_prefect
def test_pipeline_flow_links_subflows_marks_skipped_and_keeps_logs_readable(server: dict, dvc_repo: Path) -> None:
    url = server["url"]
    env = clean_env(server["home"], PREFECT_API_URL=url)
    cmd = [sys.executable, "-m", "pipeline.orchestration.dag", "run", "--repo", str(dvc_repo)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert (dvc_repo / "c_x.txt").read_text() == "abx"
    assert "pipeline: a=ran, b=ran, c@x=ran" in output
    assert "progress 200/200" in output  # the stage's own output still reaches the terminal
    assert "dvc push" not in output and "To track the changes with git" not in output

    completed = {
        "flows": {"name": {"any_": ["dvc-pipeline"]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
    }
    (run,) = api(url, "/flow_runs/filter", completed)
    assert run["name"].startswith("dvc-pipeline · ")
    tasks = poll(lambda: [t for t in task_runs_of(url, run["id"]) if t["state_type"] == "COMPLETED"])
    by_name = {t["name"]: t for t in tasks}
    assert sorted(by_name) == ["a", "b", "c@x"] and {t["state_name"] for t in tasks} == {"Completed"}

    # Stage b is a Prefect stage: its flow run is a subflow of the pipeline run, under the task run "b".
    (stage_b,) = api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["b"]}}})
    assert stage_b["state_type"] == "COMPLETED" and stage_b["name"].startswith("b · ")
    assert stage_b["parent_task_run_id"] == by_name["b"]["id"]
    children = api(url, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
    assert [c["id"] for c in children] == [stage_b["id"]]

    # Logs of the pipeline run: a line per stage, not per progress-bar refresh, no DVC hints, no nested
    # Prefect log lines (their timestamps would be doubled).
    logs = poll(lambda: api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}}))
    messages = [entry["message"] for entry in logs]
    assert len(messages) < 20, messages
    assert not [m for m in messages if "progress" in m or "dvc push" in m or " | INFO " in m], messages

    # Up to date now: every stage is a cache hit, marked "Skipped" (a state name the UI and API filter on).
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "pipeline: a=skipped, b=skipped, c@x=skipped" in again.stdout + again.stderr
    runs = api(url, "/flow_runs/filter", {"flows": {"name": {"any_": ["dvc-pipeline"]}}, "sort": "START_TIME_DESC"})
    skipped = api(
        url,
        "/task_runs/filter",
        {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}, "task_runs": {"state": {"name": {"any_": ["Skipped"]}}}},
    )
    assert sorted(t["name"] for t in skipped) == ["a", "b", "c@x"]


@pytest.mark.slow
@needs_prefect
def test_pipeline_flow_failure_is_one_line_and_a_failed_run(server: dict, tmp_path: Path) -> None:
    failing_stage_repo(tmp_path)
    cmd = [sys.executable, "-m", "pipeline.orchestration.dag", "run", "--repo", str(tmp_path)]
    env = clean_env(server["home"], PREFECT_API_URL=server["url"])
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "pipeline: DVC stage 'bad' failed" in proc.stderr and "disk on fire" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    failed = {"flows": {"name": {"any_": ["dvc-pipeline"]}}, "flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}}
    (run,) = api(server["url"], "/flow_runs/filter", failed)
    assert "DVC stage 'bad' failed" in run["state"]["message"]


# evaluate's publishing, on a metrics dict and report of the shape pipeline.report writes.
EVALUATE_SCRIPT = """
import sys
from pathlib import Path
from pipeline.engine.context import Context
from pipeline.distributed import init_distributed
from pipeline.orchestration.flows import StageRun
from stages.evaluate import publish_report

metrics = {"final_stage": "adapt", "gap_closed": {"adapt": 40.0},
           "stages": {"warmup": {"miou": 30.0, "pixel_acc": 80.0}, "adapt": {"miou": 35.5, "pixel_acc": 82.0}}}
Path("report.md").write_text("# ProDA run report\\n\\n| stage | mIoU |\\n|---|---:|\\n| adapt | 35.5 |\\n")
run = StageRun("evaluate")
ctx = Context("evaluate", 0, init_distributed("cpu"), [], run)
run.run(lambda _run: publish_report(ctx, metrics, Path("report.md")))
"""


@pytest.mark.slow
@needs_prefect
def test_evaluate_publishes_its_table_and_report(server: dict, tmp_path: Path) -> None:
    (tmp_path / "evaluate_stage.py").write_text(EVALUATE_SCRIPT)
    env = clean_env(server["home"], PREFECT_API_URL=server["url"], DVC_STAGE="evaluate", DVC_EXP_NAME="report")
    cmd = [sys.executable, str(tmp_path / "evaluate_stage.py")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = flow_runs_named(server["url"], "evaluate · report")
    arts = api(server["url"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    by_key = {a["key"]: a for a in arts}
    assert by_key["evaluate-report"]["type"] == "markdown"
    assert by_key["evaluate-report"]["data"].startswith("# ProDA run report")
    table = by_key["evaluate-table"]["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert {"stage": "adapt", "miou": 35.5, "pixel_acc": 82.0, "gap_closed": 40.0} in rows
    assert {"stage": "warmup", "miou": 30.0, "pixel_acc": 80.0, "gap_closed": None} in rows


# ---------------------------------------------------------------- real stages (tiny params) against the server

# A warm-up long enough (12-25 s at tiny sizes on 2 cores) to watch and cancel: loss lines every 10 steps, an
# evaluation every 100, no periodic resume state (so the state left after a cancel can only come from the cancel).
LIVE = {
    "warmup.optim.iters": 800,
    "warmup.optim.log_every": 10,
    "warmup.optim.eval_every": 100,
    "warmup.optim.ckpt_every": 100_000,
    "warmup.target_bn": False,
}


def stage_env(server: dict, **extra: str) -> dict[str, str]:
    return clean_env(server["home"], PREFECT_API_URL=server["url"], OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def stage_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC copy of the project with tiny params; generate and prepare done (without Prefect)."""
    from tests.tiny import stage, tiny_params, workspace

    root = workspace(tmp_path_factory.mktemp("stage-ws") / "ws", tiny_params(**LIVE), git_dvc=True)
    for name in ("generate", "prepare"):
        stage(name, root, env=clean_env(root / ".prefect", PIPELINE_PREFECT="0", OMP_NUM_THREADS="1"))
    return root


def logs_of(url: str, flow_run_id: str) -> list[str]:
    logs = api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"})
    return [entry["message"] for entry in logs]


@pytest.mark.slow
@needs_prefect
def test_training_reports_live_cancel_keeps_resume_state_and_rerun_resumes(server: dict, stage_ws: Path) -> None:
    import re

    from tests.tiny import stage_argv

    url, ws = server["url"], stage_ws
    env = stage_env(server, DVC_STAGE="warmup", DVC_EXP_NAME="live")
    proc = subprocess.Popen(stage_argv("warmup", ws), cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        runs = poll(lambda: flow_runs_named(url, "warmup · live"), timeout=60)
        assert runs, "no flow run 'warmup · live'"
        run_id = runs[0]["id"]

        def live() -> tuple | None:
            # Loss lines at the log interval, the periodic evaluation and a progress artifact above 0, all
            # read back from the server while the stage still trains.
            messages = logs_of(url, run_id)
            steps = [m for m in messages if re.search(r"step \d+/800 ce=\S+ loss=\S+ lr=\S+ img/s=\S+", m)]
            evals = [m for m in messages if "eval at step 100/800: miou=" in m]
            arts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["warmup-progress"]}}})
            progress = [a["data"] for a in arts if a["flow_run_id"] == run_id and a["type"] == "progress"]
            return (steps, evals, progress) if steps and evals and progress and progress[0] > 0 else None

        seen = poll(live, timeout=90)
        assert seen, f"no live loss/eval lines or progress: {logs_of(url, run_id)[-10:]}"
        assert proc.poll() is None, "the stage had ended before its logs were seen: they were not live"
        steps, _, (progress,) = seen
        assert len(steps) < 80  # one line per log interval, not per step
        # Cancel as the UI's Cancel button does: the flow run goes to Cancelling.
        api(url, f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        _, err_bytes = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_bytes.decode(errors="replace")
    assert proc.returncode == 130, err[-3000:]
    found = re.search(r"cancelled at iteration (\d+)/800", err)
    assert found, err[-3000:]
    stopped_at = int(found.group(1))
    assert 0 < stopped_at < 800
    assert (ws / ".resume/warmup/state.pt").is_file()
    assert not (ws / "metrics/warmup.json").exists()  # nothing that would pass for a finished stage
    assert "Traceback" not in err
    cancelled = poll(lambda: [r for r in flow_runs_named(url, "warmup · live") if r["state_type"] == "CANCELLED"])
    assert cancelled, flow_runs_named(url, "warmup · live")

    # The same command again resumes from the state the cancel left, finishes, and records its run.
    env = stage_env(server, DVC_STAGE="warmup", DVC_EXP_NAME="resumed")
    again = subprocess.run(stage_argv("warmup", ws), cwd=ws, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from iteration {stopped_at}" in again.stdout + again.stderr
    assert not (ws / ".resume/warmup").exists()
    metrics = json.loads((ws / "metrics/warmup.json").read_text())
    assert metrics["resumed_from"] == stopped_at
    (resumed,) = flow_runs_named(url, "warmup · resumed")
    assert resumed["state_type"] == "COMPLETED"
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=ws, capture_output=True, text=True)
    assert metrics["run"] == {"commit": commit.stdout.strip(), "flow_run": resumed["id"]}
    # `dvc metrics show` still reads the file: numbers as numbers, the run as two string columns.
    from tests.tiny import DVC, run

    shown = json.loads(run([*DVC, "metrics", "show", "--json"], ws).stdout)
    warmup = shown[""]["data"]["metrics/warmup.json"]["data"]  # "": the workspace
    assert isinstance(warmup["miou"], float) and warmup["run"]["flow_run"] == resumed["id"]
    table = run([*DVC, "metrics", "show", "metrics/warmup.json"], ws).stdout
    assert "run.commit" in table and "run.flow_run" in table and "miou" in table


@pytest.mark.slow
@needs_prefect
def test_bad_params_are_a_failed_flow_run_with_the_message(server: dict, stage_ws: Path) -> None:
    from tests.tiny import stage_argv, tiny_params, write_params

    url, ws = server["url"], stage_ws
    bad = ws / "bad"
    bad.mkdir()
    write_params(bad, tiny_params(**LIVE, **{"warmup.optim.lr": -1}))
    (bad / "dvc.yaml").write_text((ws / "dvc.yaml").read_text())  # what the stage declares: its parameters
    env = stage_env(server, DVC_STAGE="warmup", DVC_EXP_NAME="bad-lr")
    argv = [*stage_argv("warmup", ws), "--params", str(bad / "params.yaml")]
    res = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "warmup.optim.lr" in res.stderr and "Traceback" not in res.stderr, res.stderr
    (run,) = flow_runs_named(url, "warmup · bad-lr")
    assert run["state_type"] == "FAILED" and "warmup.optim.lr" in run["state"]["message"]
    # The flow's parameters are the sections dvc.yaml declares for the stage, as written (the bad value too).
    params = run["parameters"]
    assert set(params) == {"base", "data", "model", "warmup", "evaluate"}
    assert params["evaluate"] == {"batch_size": 4} and params["warmup"]["optim"]["lr"] == -1


@pytest.mark.slow
@needs_prefect
def test_nan_loss_is_one_line_and_one_traceback_on_request(server: dict, stage_ws: Path, tmp_path: Path) -> None:
    from tests.tiny import stage_argv, tiny_params, write_params

    url, ws = server["url"], stage_ws
    write_params(tmp_path, tiny_params(**{**LIVE, "warmup.optim.lr": 1e30, "warmup.optim.iters": 20}))
    (tmp_path / "dvc.yaml").write_text((ws / "dvc.yaml").read_text())
    argv = [*stage_argv("warmup", ws), "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "m")]
    res = subprocess.run(argv, cwd=ws, env=stage_env(server, DVC_EXP_NAME="nan"), capture_output=True, text=True)
    assert res.returncode == 1
    assert "loss is nan" in res.stderr and "Traceback" not in res.stdout + res.stderr, res.stderr
    (run,) = flow_runs_named(url, "warmup · nan")
    assert run["state_type"] == "FAILED" and "loss is nan" in run["state"]["message"]
    messages = poll(lambda: [m for m in logs_of(url, run["id"]) if "loss is nan" in m])
    assert messages and not [m for m in messages if "Traceback" in m]

    # Asked for, one traceback (Prefect's engines would add two more of their own).
    env = stage_env(server, DVC_EXP_NAME="nan-tb", PIPELINE_TRACEBACK="1")
    res = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and (res.stdout + res.stderr).count("Traceback") == 1, res.stderr


@pytest.mark.slow
def test_corrupt_or_foreign_model_file_names_the_file(stage_ws: Path, tmp_path: Path) -> None:
    import argparse

    import torch

    from pipeline.engine.checkpoint import CheckpointError, load
    from tests.tiny import stage_argv

    garbage, foreign, truncated = tmp_path / "garbage.pt", tmp_path / "foreign.pt", tmp_path / "truncated.pt"
    garbage.write_bytes(b"not a checkpoint" * 64)
    torch.save({"model": argparse.Namespace()}, foreign)  # a pickled Python object
    torch.save({"model": {"w": torch.zeros(64)}, "meta": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path, why in ((garbage, "corrupt"), (foreign, "not a file written by this pipeline"), (truncated, "corrupt")):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert str(err.value).startswith(f"cannot load checkpoint {path}: ") and why in str(err.value)
        assert "arbitrary code" not in str(err.value) and "file an issue" not in str(err.value)

    # As a stage reports it: one line naming the file, no torch advice, no traceback.
    env = clean_env(stage_ws / ".prefect", PIPELINE_PREFECT="0", OMP_NUM_THREADS="1")
    argv = [str(foreign) if a == "models/warmup/last.pt" else a for a in stage_argv("pseudo_label", stage_ws)]
    argv += ["--out", str(tmp_path / "pl.zarr")]
    res = subprocess.run(argv, cwd=stage_ws, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert f"[pseudo_label] error: cannot load checkpoint {foreign}: not a file written" in res.stderr, res.stderr
    assert "arbitrary code" not in res.stderr and "file an issue" not in res.stderr and "Traceback" not in res.stderr
