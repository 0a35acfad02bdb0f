"""Orchestration overhead of the `factory` flow next to model latency, and 20 concurrent jobs.

    uv run python benchmarks/overhead.py [--latency-ms 100] [--iterations 10] [--concurrent 20]

Everything runs on 127.0.0.1: the provider emulator from tests/ (every call takes --latency-ms),
a `prefect server start` on PostgreSQL (database `factory_bench` on 127.0.0.1:5432, recreated) and,
for the concurrency figure, a process worker on `factory-local` with the deployment from prefect.yaml.

With `--redis`, the server runs as Prefect documents for scale-out: the API and the background services as
separate processes, messaging, ordering, leases and docket on Redis (127.0.0.1:6379, dbs 3 and 4, flushed).

1. The same never-converging 10-iteration job (20 model calls), side by side: through the flow against the
   running server, in a fresh child process (cold, as a deployment run is) and again in that process
   (warm), and as a bare asyncio loop calling the same providers with the same prompts. Ratio = flow /
   bare wall time; the same at 1 iteration splits the overhead into per-run and per-iteration parts.
2. `--concurrent` jobs created at once through the deployment on one worker, wall time from creation to
   the last completion, over one job's wall time measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NEVER = {"converged": False, "confidence": 0.4, "strengths": ["s"], "weaknesses": ["w"],
         "feedback_for_executor": "Revise."}
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/factory_bench"
# Prefect's scale-out set-up (docs: "How to scale self-hosted Prefect"): events, cache, ordering, concurrency leases
# and background-task coordination in Redis, so API servers and the services can be separate processes.
REDIS_ENV = {"PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
             "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
             "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
             "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
             "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1", "PREFECT_REDIS_MESSAGING_PORT": "6379",
             "PREFECT_REDIS_MESSAGING_DB": "3", "PREFECT_SERVER_DOCKET_URL": "redis://127.0.0.1:6379/4"}


def params(iterations: int) -> dict:
    return {"seed": "Write a short poem.", "objective": "A short poem.", "job_id": f"bench-{uuid.uuid4().hex[:10]}",
            "limits": {"max_cycles": iterations, "budget_usd": 10.0}}


async def bare_loop(iterations: int) -> float:
    """The same calls with no orchestration: providers, prompts and verdict parsing only."""
    from pydantic import SecretStr

    from factory.models import FunctionType
    from factory.prompts import (
        EVALUATOR_SYSTEM,
        EXECUTOR_SYSTEM,
        VERDICT_SCHEMA,
        VERDICT_TOOL,
        Revision,
        evaluator_prompt,
        executor_prompt,
    )
    from factory.providers import ChatRequest, Message, make_provider
    from factory.verdict import parse_verdict

    started = time.perf_counter()
    provider = make_provider("anthropic", SecretStr(os.environ["ANTHROPIC_API_KEY"]))
    job, artifact, verdict = params(iterations), None, None
    for n in range(iterations):
        revision = None if verdict is None or artifact is None else Revision(
            artifact, n, verdict.feedback_for_executor, verdict.strengths, verdict.weaknesses)
        prompt = executor_prompt(job["seed"], job["objective"], FunctionType.TEXT_GENERATION, [], [], revision).text
        reply = await provider.complete(ChatRequest(model="claude-sonnet-5-5", system=EXECUTOR_SYSTEM,
                                                    messages=[Message(role="user", content=prompt)],
                                                    max_tokens=8192), timeout_s=60)
        artifact = reply.text
        judged = await provider.complete(ChatRequest(
            model="claude-sonnet-5-5", system=EVALUATOR_SYSTEM, max_tokens=4096, response_schema=VERDICT_SCHEMA,
            schema_name=VERDICT_TOOL, messages=[Message(role="user", content=evaluator_prompt(
                job["objective"], job["seed"], artifact).text)]), timeout_s=60)
        verdict = parse_verdict(judged.structured, judged.text)
    wall = time.perf_counter() - started
    await provider.aclose()
    return wall


class ApiTraffic:
    """The Prefect API requests and events a process makes while counting: what orchestration costs the server."""

    def __init__(self) -> None:
        import re
        from collections import Counter

        import httpx
        from prefect.events.clients import EventsClient

        self.requests: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.counting = False
        api = os.environ["PREFECT_API_URL"]
        ids = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
        send, emit, traffic = httpx.AsyncClient.send, EventsClient.emit, self

        async def counted_send(client, request, **kwargs):
            if traffic.counting and str(request.url).startswith(api):
                traffic.requests[f"{request.method} {ids.sub('{id}', request.url.path[len('/api'):])}"] += 1
            return await send(client, request, **kwargs)

        async def counted_emit(client, event):
            if traffic.counting:
                traffic.events[event.event] += 1
            return await emit(client, event)

        httpx.AsyncClient.send, EventsClient.emit = counted_send, counted_emit


async def flow_child(iterations: int) -> None:
    """Two jobs in one fresh process: the first pays the process's warm-up (as every deployment run
    does), the second shows the steady state of a long-lived process; the second's API traffic is counted."""
    import factory.providers.anthropic
    from flows.job import factory

    traffic = ApiTraffic()
    walls = []
    for attempt in range(2):
        traffic.counting = attempt == 1
        started = time.perf_counter()
        result = await factory(**params(iterations))
        walls.append(time.perf_counter() - started)
        assert result.total_iterations == iterations, result
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cold_s": walls[0], "warm_s": walls[1], "peak_rss_mb": peak_mb,
                      "requests": traffic.requests, "events": traffic.events}))


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    import httpx
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("the Prefect server did not become healthy")


async def run_deployments(count: int, iterations: int) -> float:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    started = time.perf_counter()
    runs = await asyncio.gather(*(run_deployment("factory/job", parameters=params(iterations), timeout=0)
                                  for _ in range(count)))
    async with get_client() as client:
        while True:
            states = [(await client.read_flow_run(r.id)).state for r in runs]
            if all(s.is_final() for s in states):
                break
            await asyncio.sleep(0.2)
    assert all(s.is_completed() for s in states), [s.message for s in states if not s.is_completed()]
    return time.perf_counter() - started


def side_by_side(iterations: int, env: dict) -> tuple[float, float, float, float]:
    """Medians of the flow's cold and warm wall times (child processes) and of the bare loop, alternated;
    the peak RSS of the flow processes in MB."""
    flows, bares = [], []
    for _ in range(3):
        out = subprocess.run([sys.executable, __file__, "--child", "--iterations", str(iterations)],
                             env=env, capture_output=True, text=True, check=True).stdout
        flows.append(json.loads(out.strip().splitlines()[-1]))
        bares.append(asyncio.run(bare_loop(iterations)))
    return (sorted(f["cold_s"] for f in flows)[1], sorted(f["warm_s"] for f in flows)[1], sorted(bares)[1],
            max(f["peak_rss_mb"] for f in flows), flows[-1])


def single_job(n: int, env: dict, latency_ms: float) -> None:
    cold_n, warm_n, bare_n, rss, child = side_by_side(n, env)
    cold_1, warm_1, bare_1, _, _ = side_by_side(1, env)
    print(f"{n}-iteration job, {latency_ms:.0f} ms per call (medians of 3, side by side):")
    print(f"  bare asyncio loop: {bare_n:.3f} s")
    for label, flow_n, flow_1 in (("fresh process (a deployment run)", cold_n, cold_1),
                                  ("warm process (a later job)", warm_n, warm_1)):
        fixed = flow_1 - bare_1
        per_iteration = ((flow_n - bare_n) - fixed) / (n - 1) * 1000
        print(f"  flow, {label}: {flow_n:.3f} s, ratio {flow_n / bare_n:.3f}; overhead "
              f"{(flow_n - bare_n) / n * 1000:.1f} ms per iteration on average = {fixed * 1000:.0f} ms per "
              f"flow run + {per_iteration:.1f} ms per further iteration")
    print(f"  peak RSS of the flow process: {rss:.0f} MB")
    for kind in ("requests", "events"):
        counts = sorted(child[kind].items(), key=lambda item: -item[1])
        print(f"  Prefect API {kind} of one warm {n}-iteration job: {sum(child[kind].values())} "
              f"({', '.join(f'{name} {count}' for name, count in counts)})")


def tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children, the finished ones included."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system + times.children_user + times.children_system


def tree_cpu(pids: list[int]) -> float:
    """CPU time of the process trees under `pids` (the server's API and services)."""
    return sum(cpu_seconds(p.pid) for pid in pids for p in tree(pid))


class PeakRss:
    """The highest summed RSS of a process tree, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak_mb, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            try:
                total = sum(p.memory_info().rss for p in tree(self.pid))
            except psutil.Error:
                continue
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def pool_figures(prefect: str, env: dict, work: Path, pool_type: str, args: argparse.Namespace,
                 server_pids: list[int]) -> subprocess.Popen:
    """One job, then `--concurrent` jobs at once, on a worker of `pool_type`: wall time over one job's,
    orchestration CPU-seconds per job (worker and server trees, from /proc), the worker's peak RSS."""
    subprocess.run([prefect, "--no-prompt", "work-pool", "delete", "factory-local"], env=env, capture_output=True)
    for cmd in (["work-pool", "create", "factory-local", "--type", pool_type], ["--no-prompt", "deploy", "--all"]):
        subprocess.run([prefect, *cmd], env=env, cwd=REPO, check=True, capture_output=True)
    worker = start([prefect, "worker", "start", "--pool", "factory-local", "--limit", str(args.concurrent)],
                   env, work / f"worker-{pool_type}.log")
    asyncio.run(run_deployments(1, args.iterations))  # warm: the worker has started and loaded the flow
    one = asyncio.run(run_deployments(1, args.iterations))
    bare = asyncio.run(bare_loop(args.iterations))
    worker_before, server_before = cpu_seconds(worker.pid), tree_cpu(server_pids)
    peak = PeakRss(worker.pid)
    many = asyncio.run(run_deployments(args.concurrent, args.iterations))
    rss = peak.stop()
    worker_cpu, serving_cpu = cpu_seconds(worker.pid) - worker_before, tree_cpu(server_pids) - server_before
    cpu = worker_cpu + serving_cpu
    setup = "PostgreSQL + Redis, API and services apart" if args.redis else "PostgreSQL"
    print(f"{args.concurrent} jobs at once on one {pool_type} worker (server: {setup}), "
          f"{args.latency_ms:.0f} ms per call:")
    print(f"  one job on the warm worker, creation to completion: {one:.2f} s, over the bare loop's {bare:.2f} s: "
          f"{one / bare:.3f}")
    print(f"  one job: {one:.2f} s   {args.concurrent} jobs: {many:.2f} s   ratio: {many / one:.2f}   "
          f"orchestration CPU: {cpu / args.concurrent:.2f} s per job (worker {worker_cpu / args.concurrent:.2f}, "
          f"server {serving_cpu / args.concurrent:.2f})   worker peak RSS: {rss:.0f} MB")
    return worker


def start_server(prefect: str, env: dict, work: Path, port: int, redis: bool) -> list[subprocess.Popen]:
    """`prefect server start` with its services; with `redis`, the API alone and `prefect server services start`
    beside it, on a flushed Redis."""
    serve = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if not redis:
        return [start(serve, env, work / "server.log")]
    import redis as redis_client

    for db in (3, 4):
        redis_client.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
    api = start([*serve, "--no-services"], env, work / "server.log")
    wait_healthy(env["PREFECT_API_URL"])  # the API migrates the database before the services use it
    return [api, start([prefect, "server", "services", "start"], env, work / "services.log")]


def recreate_database() -> None:
    for sql in ("DROP DATABASE IF EXISTS factory_bench WITH (FORCE)", "CREATE DATABASE factory_bench"):
        subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc", sql], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--pools", default="process,inprocess", help="work pool types to measure, in order")
    parser.add_argument("--skip-single", action="store_true", help="only the concurrency figures")
    parser.add_argument("--redis", action="store_true", help="the server in Prefect's scale-out set-up: API and "
                        "background services as separate processes, messaging on Redis at 127.0.0.1:6379")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(flow_child(args.iterations))
        return

    from tests.emulators.llm import API_KEY, Emulator, Script
    from tests.emulators.server import ThreadedServer, free_port

    emulator = Emulator()
    emulator.reset(Script(verdicts=[NEVER], latency_s=args.latency_ms / 1000))
    llm = ThreadedServer(emulator.app).start()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"factory-bench-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "ANTHROPIC_BASE_URL": llm.url, "ANTHROPIC_API_KEY": API_KEY,
           "PREFECT_HOME": str(work / "home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_API_DATABASE_CONNECTION_URL": PG_URL, "FACTORY_STORAGE_ROOT": str(work / "storage"),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if args.redis:
        env.update(REDIS_ENV)
    os.environ.update(env)
    recreate_database()
    prefect = str(Path(sys.executable).parent / "prefect")
    servers = start_server(prefect, env, work, port, args.redis)
    worker = None
    try:
        wait_healthy(env["PREFECT_API_URL"])
        n = args.iterations
        if not args.skip_single:
            single_job(n, env, args.latency_ms)
        for pool_type in args.pools.split(","):
            worker = pool_figures(prefect, env, work, pool_type, args, [p.pid for p in servers])
            stop(worker)
            worker = None
    finally:
        if worker is not None:
            stop(worker)
        for server in servers:
            stop(server)
        llm.stop()


if __name__ == "__main__":
    main()
