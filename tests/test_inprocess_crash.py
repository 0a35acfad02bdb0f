"""A resident worker killed mid-job, as a lost machine kills it: Prefect's own crash detection (flow-run heartbeats
and the zombie-run automation in automations/) marks its run Crashed, and a re-run with the same job_id on a new
worker resumes from the cache."""

from __future__ import annotations

import json
import os
import signal
import time
from decimal import Decimal
from types import SimpleNamespace

import pytest
import yaml

from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET
from tests.processes import (
    FINAL_STATES,
    REPO,
    Background,
    deployment_run,
    inprocess_pool,
    prefect_bin,
    run_cli,
    served_deployment,
    wait_state,
)
from tests.test_concurrency_pg import job_cost

pytestmark = pytest.mark.cli
SEED = "Write a sonnet about lighthouses."


@pytest.fixture(scope="module")
def heartbeating(llm_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("killed")
    # Prefect's shortest heartbeat; the worker's runs beat from its own threads.
    with served_deployment(work, {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"},
                           pool_options=inprocess_pool) as served:
        yield {**served, "work": work}


def test_a_killed_workers_run_is_crashed_by_prefect_and_resumes_from_the_cache(heartbeating, llm_server):
    served, env = heartbeating, heartbeating["env"]
    automation = yaml.safe_load((REPO / "automations" / "crash-zombie-runs.yaml").read_text())
    automation["trigger"]["within"] = 45  # the shipped 90 s, shortened for the test: still over the 30 s beat
    created = run_cli(["automation", "create", "--from-json", json.dumps(automation)], env)
    assert created.returncode == 0, created.stdout + created.stderr

    # Each call takes 3 s: the kill lands while iteration 2's executor call is in flight.
    llm_server.reset(Script(verdicts=[NOT_YET, NOT_YET, DONE], latency_s=3.0))
    params = {"seed": SEED, "objective": "A sonnet.", "job_id": "killed-1", "limits": {"max_cycles": 5}}
    first = deployment_run(env, params)
    log = served["storage"] / "killed-1" / "log.json"
    deadline = time.monotonic() + 120
    while not log.exists() or "ITERATION_END" not in log.read_text():
        assert time.monotonic() < deadline, served["worker"].log.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(served["worker"].proc.pid, signal.SIGKILL)
    served["worker"].proc.wait(timeout=10)
    paid_first = list(llm_server.billed[:2])  # iteration 1: its executor and evaluator
    assert [b.role for b in paid_first] == ["executor", "evaluator"]

    assert wait_state(served, first, FINAL_STATES, timeout_s=150) == "CRASHED"
    lost = llm_server.billed[2:]  # in flight at the kill, if it was sent: billed, and known to nobody
    assert [b.role for b in lost] in ([], ["executor"])

    worker = Background([prefect_bin(), "worker", "start", "--pool", "factory-local"], env,
                        served["work"] / "worker-2.log")
    served["worker"] = worker
    try:
        rerun = deployment_run(env, params)
        assert wait_state(served, rerun, FINAL_STATES, timeout_s=120) == "COMPLETED"
    finally:
        worker.stop()
    result = json.loads((served["storage"] / "killed-1" / "result.json").read_text())
    assert result["status"] == "CONVERGED" and result["total_iterations"] == 3
    paid_again = llm_server.billed[2 + len(lost):]
    assert [b.role for b in paid_again] == ["executor", "evaluator"] * 2, "iteration 1 comes from the cache"
    assert not {b.prompt for b in paid_first} & {b.prompt for b in paid_again}
    known = SimpleNamespace(billed=[*paid_first, *paid_again])
    assert Decimal(str(result["total_cost_usd"])) == job_cost(known, SEED)
