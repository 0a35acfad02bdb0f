"""The deployment as a user runs it: `prefect server start`, `prefect deploy --all`, a process
worker, and `prefect deployment run factory/job --params ... --watch` through the real CLI."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.browser import Browser
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, read_log
from tests.processes import deployment_run, run_cli, served_deployment

pytestmark = pytest.mark.cli


@pytest.fixture(scope="module")
def served(llm_server, tmp_path_factory):
    with served_deployment(tmp_path_factory.mktemp("cli"), {}) as deployment:
        yield deployment


def test_deployment_run_through_the_cli(served, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET, DONE]))
    params = {"seed": "Write a limerick about queues.", "objective": "A limerick about queues.",
              "job_id": "cli-job-1", "limits": {"max_cycles": 4, "budget_usd": 1.0}}
    run = run_cli(["deployment", "run", "factory/job", "--params", json.dumps(params), "--watch",
                   "--watch-timeout", "180"], served["env"], timeout_s=240)
    assert run.returncode == 0, run.stdout + run.stderr + served["worker"].log.read_text()[-3000:]
    assert "Completed" in run.stdout
    result = json.loads((served["storage"] / "cli-job-1" / "result.json").read_text())
    assert result["status"] == "CONVERGED" and result["total_iterations"] == 2
    assert result["total_cost_usd"] > 0
    assert read_log(result["log_ref"])[-1]["event"] == "JOB_COMPLETED"


def test_cli_refuses_bad_parameters_naming_the_field(served):
    params = {"seed": "s", "objective": "o", "limits": {"budget_usd": 500}}
    run = run_cli(["deployment", "run", "factory/job", "--params", json.dumps(params)], served["env"])
    assert run.returncode != 0
    assert "limits.budget_usd" in run.stdout + run.stderr


def _flow_run_state(api_url: str, flow_run_id: str) -> str:
    return httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10).json()["state"]["type"]


def test_cancelling_a_run_ends_the_job_cancelled_with_a_complete_log(served, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET], latency_s=1.0))
    params = {"seed": "Write an essay.", "objective": "An essay.", "job_id": "cli-cancel-1",
              "limits": {"max_cycles": 30}}
    flow_run_id = deployment_run(served["env"], params)
    log_path = served["storage"] / "cli-cancel-1" / "log.json"
    deadline = time.monotonic() + 120
    while not (log_path.exists() and any(e["event"] == "ITERATION_END" for e in read_log(log_path))):
        assert time.monotonic() < deadline, served["worker"].log.read_text()[-3000:]
        time.sleep(0.5)
    cancel = run_cli(["flow-run", "cancel", flow_run_id], served["env"])
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    deadline = time.monotonic() + 90
    while _flow_run_state(served["api_url"], flow_run_id) != "CANCELLED":
        assert time.monotonic() < deadline, served["worker"].log.read_text()[-3000:]
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while read_log(log_path)[-1]["event"] != "JOB_COMPLETED":
        assert time.monotonic() < deadline, served["worker"].log.read_text()[-3000:]
        time.sleep(0.5)
    last = read_log(log_path)[-1]["data"]
    assert last["status"] == "CANCELLED" and last["stop_reason"] == "CANCELLED"
    calls_at_cancel = len(llm_server.requests)
    time.sleep(3)
    assert len(llm_server.requests) == calls_at_cancel, "no call may be made after the cancel"


@pytest.mark.browser
async def test_prefect_ui_shows_the_jobs_artifacts(served, tmp_path):
    params = {"seed": "Write a haiku.", "objective": "A haiku.", "job_id": "ui-job-1",
              "executor_model": "dry-run", "evaluator_model": "dry-run"}
    flow_run_id = deployment_run(served["env"], params, "--watch", timeout_s=240)
    ui = served["api_url"].removesuffix("/api")
    async with Browser() as browser:
        await browser.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        await browser.wait_for_text("Artifacts")
        await browser.click_text(".p-tab", "Artifacts")
        await browser.wait_for_text("factory-ui-job-1-summary")
        # The list renders in pieces: the summary's key can show before its description does.
        page = await browser.wait_for_text("CONVERGED: CONFORMITY")
        await browser.screenshot(tmp_path / "flow-run-artifacts.png")
    for key in ("iteration-1", "iteration-2", "iterations", "budget", "progress"):
        assert f"factory-ui-job-1-{key}" in page
    assert "Completed" in page
    assert (tmp_path / "flow-run-artifacts.png").stat().st_size > 10_000
