"""Start the local Prefect server so that it stays up, also offline, and wait until it answers.

    python -m pipeline.orchestration.server [--host 127.0.0.1] [--port 4200] [--log .prefect-server.log]

``prefect server start --background`` reports success and then, on a machine without internet (or behind a
firewall), dies 20-40 s later without a word: its telemetry call fails and it logs into a closed pipe. Started
with ``PREFECT_SERVER_ANALYTICS_ENABLED=false`` (``SERVER_ENV``), detached into its own session with its output
in a log file, it stays up. The tests start their server with the same settings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from pipeline.orchestration.flows import api_healthy

# Settings every server this project starts gets.
SERVER_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def server_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``SERVER_ENV`` and ``extra`` applied."""
    return {**(os.environ if base is None else base), **SERVER_ENV, **extra}


def healthy(api_url: str, timeout: float = 1.0) -> bool:
    return api_healthy(api_url, timeout)


def start_server(
    host: str, port: int, log: Path, env: Mapping[str, str] | None = None, timeout: float = 90.0
) -> subprocess.Popen:
    """Starts ``prefect server start`` detached (own session, output to ``log``) and waits for its health check.

    Raises RuntimeError with the log's tail when it exits or does not answer within ``timeout`` seconds.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    api = f"http://{host}:{port}/api"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            env=server_env(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the shell that started it; killpg reaches its workers
        )
    deadline = time.monotonic() + timeout
    while not healthy(api):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"prefect server did not start on {host}:{port} (log {log}):\n{tail}")
        time.sleep(0.5)
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.orchestration.server", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=4200)
    ap.add_argument("--log", type=Path, default=Path(".prefect-server.log"))
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the server to answer")
    args = ap.parse_args(argv)
    api = f"http://{args.host}:{args.port}/api"
    if healthy(api):
        print(f"a Prefect server already answers at {api}")
    else:
        try:
            proc = start_server(args.host, args.port, args.log, timeout=args.timeout)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"Prefect server running (pid {proc.pid}, log {args.log}); stop it with: kill -- -{proc.pid}")
    print(
        f"UI: http://{args.host}:{args.port}\nthen, in the shell that runs the pipeline: export PREFECT_API_URL={api}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
