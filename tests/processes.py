"""Start and stop the real Prefect CLI processes a test needs: by PID, with bounded waits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.emulators.server import free_port

REPO = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10.0
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_bin() -> str:
    return str(Path(os.sys.executable).parent / "prefect")


class Background:
    """A process in its own session, so stopping it stops its children (flow runs) too."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._handle = open(log, "wb")
        self.proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=self._handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_GRACE_S)
        self._handle.close()


def wait_healthy(api_url: str, server: Background, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {server.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout_s}s: {server.log.read_text()[-2000:]}")


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([prefect_bin(), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


def deployment_run(env: dict[str, str], params: dict, *options: str, deployment: str = "factory/job",
                   timeout_s: float = 120.0) -> str:
    """`prefect deployment run <deployment> --params '...'` as a user types it; the flow run id it prints."""
    run = run_cli(["deployment", "run", deployment, "--params", json.dumps(params), *options], env, timeout_s)
    assert run.returncode == 0, run.stdout + run.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)


def flow_run_state(api_url: str, flow_run_id: str) -> str:
    return httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10).json()["state"]["type"]


def wait_state(served: dict, flow_run_id: str, states: set[str], timeout_s: float = 180) -> str:
    """Wait for a flow run of a `served_deployment` to reach one of `states`; the worker's log on timeout."""
    deadline = time.monotonic() + timeout_s
    while (state := flow_run_state(served["api_url"], flow_run_id)) not in states:
        assert time.monotonic() < deadline, f"{state}: " + served["worker"].log.read_text()[-3000:]
        time.sleep(0.5)
    return state


PSQL = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc"]


@contextmanager
def postgres_database() -> Iterator[dict[str, str]]:
    """A fresh database on the machine's PostgreSQL, dropped on exit: the server settings that point Prefect at it."""
    import uuid

    database = f"factory_test_{uuid.uuid4().hex[:8]}"
    subprocess.run([*PSQL, f"CREATE DATABASE {database}"], check=True)
    try:
        yield {"PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"}
    finally:
        subprocess.run([*PSQL, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"], check=True)


def process_pool(env: dict[str, str], work: Path) -> list[str]:
    return ["--type", "process"]


def inprocess_pool(env: dict[str, str], work: Path) -> list[str]:
    return ["--type", "inprocess"]


@contextmanager
def served_deployment(work: Path, extra_env: dict[str, str], worker_limit: int = 10, pool: str = "factory-local",
                      pool_options: Callable[[dict[str, str], Path], list[str] | None] = process_pool,
                      prefect_file: str = "prefect.yaml") -> Iterator[dict]:
    """`prefect server start`, a work pool, `prefect deploy --all` and a worker, as a user sets them up;
    all stopped on exit. `extra_env` can point the server at PostgreSQL; `pool_options` gives the
    `prefect work-pool create` options once the server answers."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    storage = work / "storage"
    env = {**os.environ, "PREFECT_HOME": str(work / "home"), "PREFECT_API_URL": api_url,
           "PREFECT_UI_API_URL": api_url, "FACTORY_STORAGE_ROOT": str(storage), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", **extra_env}
    server = Background([prefect_bin(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                        work / "server.log")
    worker = None
    try:
        wait_healthy(api_url, server)
        if (options := pool_options(env, work)) is not None:  # None: the callable made the pool itself
            created = run_cli(["work-pool", "create", pool, *options], env)
            assert created.returncode == 0, created.stdout + created.stderr
        deployed = run_cli(["--no-prompt", "deploy", "--all", "--prefect-file", prefect_file], env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        worker = Background([prefect_bin(), "worker", "start", "--pool", pool, "--limit", str(worker_limit)], env,
                            work / "worker.log")
        yield {"env": env, "api_url": api_url, "storage": storage, "worker": worker}
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
