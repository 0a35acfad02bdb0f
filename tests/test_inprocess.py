"""The resident `inprocess` pool as a user runs it: `prefect work-pool create --type inprocess`, `prefect deploy`,
`prefect worker start --limit N`, against a real Prefect server: many jobs in one process, each its own."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from decimal import Decimal

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET
from tests.processes import inprocess_pool, postgres_database, run_cli, served_deployment
from tests.test_concurrency_pg import job_cost

pytestmark = pytest.mark.cli
JOBS = 20


@pytest.fixture(scope="module")
def resident(llm_server, tmp_path_factory):
    # PostgreSQL, as Prefect's production set-up: twenty runs starting at once make SQLite answer 503.
    # Provider limits on: a limit the operator did not create is no limit, so only the test that creates one sees it.
    with postgres_database() as database, served_deployment(tmp_path_factory.mktemp("resident"),
                                                            {**database, "FACTORY_PROVIDER_LIMITS": "true"},
                                                            worker_limit=JOBS + 5,
                                                            pool_options=inprocess_pool) as served:
        yield served


async def start(served: dict, params: list[dict], **options) -> list:
    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        return list(await asyncio.gather(*(run_deployment("factory/job", timeout=0, parameters=p, **options)
                                           for p in params)))


async def wait_final(served: dict, runs: list, timeout_s: float = 240) -> list:
    deadline = time.monotonic() + timeout_s
    with temporary_settings(updates={PREFECT_API_URL: served["api_url"]}):
        async with get_client() as client:
            while True:
                states = [(await client.read_flow_run(r.id)).state for r in runs]
                if all(s.is_final() for s in states):
                    return states
                if time.monotonic() > deadline:
                    print(served["worker"].log.read_text()[-20000:])  # pytest shows it with the failure
                    raise AssertionError(f"runs not final in {timeout_s} s: {[s.type.value for s in states]}")
                await asyncio.sleep(0.5)


def result_of(served: dict, job_id: str) -> dict:
    return json.loads((served["storage"] / job_id / "result.json").read_text())


def worker_pids(served: dict) -> set[int]:
    """The processes under the worker: the worker alone on a resident pool."""
    import psutil

    root = psutil.Process(served["worker"].proc.pid)
    return {p.pid for p in [root, *root.children(recursive=True)] if "prefect" in " ".join(p.cmdline())}


async def test_twenty_jobs_share_one_process_and_keep_their_own_money_and_logs(resident, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET, DONE], latency_s=0.2))
    seeds = [f"Write poem number {i} about {uuid.uuid4().hex[:6]}." for i in range(JOBS)]
    pids_before = worker_pids(resident)
    runs = await start(resident, [{"seed": seed, "objective": "A poem.", "job_id": f"res-{i}",
                                   "limits": {"max_cycles": 6}} for i, seed in enumerate(seeds)])
    states = await wait_final(resident, runs)
    assert all(s.is_completed() for s in states), [s.message for s in states]
    assert worker_pids(resident) == pids_before, "no flow-run process was started"
    for i, seed in enumerate(seeds):
        result = result_of(resident, f"res-{i}")
        assert result["status"] == "CONVERGED"
        assert Decimal(str(result["total_cost_usd"])) == job_cost(llm_server, seed), f"job res-{i}"
        log = json.loads((resident["storage"] / f"res-{i}" / "log.json").read_text())
        assert log["job_id"] == f"res-{i}" and log["events"][-1]["event"] == "JOB_COMPLETED"
        assert all(e["data"].get("job_id", f"res-{i}") == f"res-{i}" for e in log["events"])
    with temporary_settings(updates={PREFECT_API_URL: resident["api_url"]}):
        async with get_client() as client:
            logs = await client.read_logs()
    for run in runs[:3]:  # each run's Prefect log holds its own job only
        own = [entry.message for entry in logs if entry.flow_run_id == run.id]
        assert any("Finished in state Completed" in m for m in own)
        others = {f"res-{i}" for i in range(JOBS)} - {run.parameters["job_id"]}
        assert not any(o + " " in m or o + "'" in m for m in own for o in others)


async def test_cancelling_one_run_cancels_only_it_and_a_failing_run_leaves_the_others(resident, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET], latency_s=0.5))
    slow = [{"seed": f"Write essay {i}.", "objective": "An essay.", "job_id": f"res-slow-{i}",
             "limits": {"max_cycles": 8}} for i in range(3)]
    failing = {"seed": "Write a note.", "objective": "A note.", "job_id": "res-fail",
               "limits": {"max_cycles": 8},
               "input_refs": ["missing-file-that-does-not-exist.txt"]}
    logs = [resident["storage"] / f"res-slow-{i}" / "log.json" for i in range(3)]

    async def iterated(paths: list) -> None:
        deadline = time.monotonic() + 60
        while not all(p.exists() and "ITERATION_END" in p.read_text() for p in paths):
            assert time.monotonic() < deadline, resident["worker"].log.read_text()[-3000:]
            await asyncio.sleep(0.3)

    # The run that starts alone is the one whose engine would own the process's SIGTERM handler: cancelling it
    # must not signal the worker.
    runs = await start(resident, slow[:1])
    await iterated(logs[:1])
    runs += await start(resident, [*slow[1:], failing])
    await iterated(logs)
    with temporary_settings(updates={PREFECT_API_URL: resident["api_url"]}):
        async with get_client() as client:
            await client.set_flow_run_state(runs[0].id, Cancelling(), force=True)
    cancelled = (await wait_final(resident, runs[:1], timeout_s=60))[0]
    assert cancelled.is_cancelled(), cancelled
    log = json.loads(logs[0].read_text())
    assert log["events"][-1]["event"] == "JOB_COMPLETED"
    assert log["events"][-1]["data"]["status"] == "CANCELLED"
    rest = runs[1:3]
    with temporary_settings(updates={PREFECT_API_URL: resident["api_url"]}):
        async with get_client() as client:
            others = [(await client.read_flow_run(r.id)).state for r in rest]
            failed = (await wait_final(resident, runs[3:], timeout_s=60))[0]
    if not all(s.is_running() for s in others):
        print(resident["worker"].log.read_text()[-20000:])  # pytest shows it with the failure
        raise AssertionError(others)
    assert failed.is_failed() and "input_refs" in (failed.message or ""), failed
    states = await wait_final(resident, rest)
    assert all(s.is_completed() for s in states), [s.message for s in states]
    assert all(result_of(resident, f"res-slow-{i}")["status"] == "EXHAUSTED" for i in (1, 2))


async def test_a_run_with_env_job_variables_is_refused_naming_env(resident):
    runs = await start(resident, [{"seed": "s", "objective": "o", "job_id": "res-env",
                                   "executor_model": "dry-run", "evaluator_model": "dry-run"}],
                       job_variables={"env": {"OPENAI_API_KEY": "sk-not-for-this-run"}})
    state = (await wait_final(resident, runs, timeout_s=60))[0]
    assert state.is_failed()
    assert "`env`" in state.message and "OPENAI_API_KEY" in state.message
    assert "sk-not-for-this-run" not in state.message
    assert not (resident["storage"] / "res-env").exists(), "the refused run made nothing"


def test_the_work_pool_lists_the_inprocess_variables(resident):
    pool = httpx.get(f"{resident['api_url']}/work_pools/factory-local", timeout=10).json()
    assert pool["type"] == "inprocess"
    variables = pool["base_job_template"]["variables"]["properties"]
    assert "Must stay empty" in variables["env"]["description"]


async def test_a_shared_limit_of_two_calls_in_flight_holds_across_ten_jobs(resident, llm_server):
    created = run_cli(["global-concurrency-limit", "create", "factory-anthropic", "--limit", "2"], resident["env"])
    assert created.returncode == 0, created.stdout + created.stderr
    try:
        llm_server.reset(Script(verdicts=[NOT_YET, DONE], latency_s=0.3))
        runs = await start(resident, [{"seed": f"Write limerick {i}.", "objective": "A limerick.",
                                       "job_id": f"res-limit-{i}", "limits": {"max_cycles": 4}} for i in range(10)])
        states = await wait_final(resident, runs)
        assert all(s.is_completed() for s in states), [s.message for s in states]
        assert len(llm_server.requests) >= 20, "every job made its calls"
        assert llm_server.most_open_calls == 2, "the limit held, and was used in full"
        costs = [result_of(resident, f"res-limit-{i}")["total_cost_usd"] for i in range(10)]
        assert all(c > 0 for c in costs)
    finally:
        run_cli(["--no-prompt", "global-concurrency-limit", "delete", "factory-anthropic"], resident["env"])


# A resident worker's memory grows while its pools, caches and allocator arenas fill, then levels off. A leak of one
# loaded flow or run context per run (a few MB each) would add far more than the bound over the last hundred runs.
MEMORY_GROWTH_BOUND_MB = 25
MEMORY_BOUND_MB = 1024


async def test_the_workers_memory_stays_bounded_over_two_hundred_jobs(resident):
    import psutil

    worker = psutil.Process(resident["worker"].proc.pid)

    async def wave(first: int, count: int = JOBS) -> float:
        runs = await start(resident, [{"seed": f"Say {n}.", "objective": "A word.", "job_id": f"res-mem-{n}",
                                       "executor_model": "dry-run", "evaluator_model": "dry-run",
                                       "limits": {"max_cycles": 1}} for n in range(first, first + count)])
        states = await wait_final(resident, runs)
        assert all(s.is_completed() for s in states), [s.message for s in states]
        return worker.memory_info().rss / 2**20

    rss = [await wave(first) for first in range(0, 220, JOBS)]  # 220 jobs, twenty at a time
    print("worker RSS (MB) after each twenty jobs:", [round(mb) for mb in rss])
    assert rss[-1] - rss[5] <= MEMORY_GROWTH_BOUND_MB, f"grew over the last hundred jobs: {rss}"
    assert max(rss) <= MEMORY_BOUND_MB
