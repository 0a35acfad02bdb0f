"""Several jobs at once on a PostgreSQL-backed Prefect server and one process worker: each job's
money, artifacts and log stay its own."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from decimal import Decimal

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from factory.pricing import price_table
from factory.settings import get_settings
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET
from tests.processes import postgres_database, served_deployment

pytestmark = pytest.mark.cli
JOBS = 4


@pytest.fixture(scope="module")
def postgres_served(llm_server, tmp_path_factory):
    with postgres_database() as database, served_deployment(tmp_path_factory.mktemp("pg"), database) as served:
        yield served


def job_cost(emulator, seed: str) -> Decimal:
    table = price_table(get_settings())
    return sum((Decimal(b.input_tokens) * table[b.model].input + Decimal(b.output_tokens) * table[b.model].output)
               / Decimal(1_000_000) for b in emulator.billed if seed in b.prompt)


async def test_concurrent_jobs_keep_their_own_money_and_logs(postgres_served, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET, DONE, NOT_YET, DONE], latency_s=0.1))
    seeds = [f"Write poem number {i} about {uuid.uuid4().hex[:6]}." for i in range(JOBS)]
    with temporary_settings(updates={PREFECT_API_URL: postgres_served["api_url"]}):
        runs = await asyncio.gather(*(
            run_deployment("factory/job", timeout=0, parameters={
                "seed": seed, "objective": "A poem.", "job_id": f"pg-{i}", "limits": {"max_cycles": 6}})
            for i, seed in enumerate(seeds)))
        async with get_client() as client:
            for _ in range(600):
                states = [(await client.read_flow_run(r.id)).state for r in runs]
                if all(s.is_final() for s in states):
                    break
                await asyncio.sleep(0.5)
    assert all(s.is_completed() for s in states), [s.message for s in states] + [
        postgres_served["worker"].log.read_text()[-3000:]]
    for i, seed in enumerate(seeds):
        result = json.loads((postgres_served["storage"] / f"pg-{i}" / "result.json").read_text())
        assert result["status"] == "CONVERGED"
        assert Decimal(str(result["total_cost_usd"])) == job_cost(llm_server, seed), f"job pg-{i}"
        log = json.loads((postgres_served["storage"] / f"pg-{i}" / "log.json").read_text())
        assert log["job_id"] == f"pg-{i}" and log["events"][-1]["event"] == "JOB_COMPLETED"
    assert os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") is None
