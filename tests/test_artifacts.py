"""Every iteration, the budget, progress and the result as Prefect artifacts, read back through the API."""

from __future__ import annotations

import pytest

from flows.report import artifact_key, fenced
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, artifacts_of, run_job


@pytest.mark.fast
def test_artifact_keys_are_valid():
    assert artifact_key("Job_1.final", "iteration-2") == "factory-job-1-final-iteration-2"
    assert fenced("a ```` b") == "`````\na ```` b\n`````"


async def test_every_iteration_budget_progress_and_summary_are_artifacts(factory_env):
    llm = factory_env
    llm.reset(Script(executor=["Draft {n}: " + "x" * 5000], verdicts=[NOT_YET, DONE]))
    state = await run_job(job_id="Art-1", limits={"max_cycles": 4, "budget_usd": 1.0})
    assert state.is_completed()
    found = await artifacts_of(state.state_details.flow_run_id)
    assert {"factory-art-1-iteration-1", "factory-art-1-iteration-2", "factory-art-1-iterations",
            "factory-art-1-budget", "factory-art-1-progress", "factory-art-1-summary"} <= set(found)

    first = found["factory-art-1-iteration-1"][-1]
    assert first.type == "markdown"
    assert "Draft 1:" in first.data and "too short" in first.data and "Make it longer." in first.data
    assert "more characters in the full file" in first.data, "a long artifact is trimmed in the UI"
    assert "not converged, confidence 0.40" in first.data and "$" in first.data

    table = found["factory-art-1-iterations"][-1]
    assert table.type == "table"
    rows = __import__("json").loads(table.data)
    assert [r["n"] for r in rows] == [1, 2] and rows[1]["converged"] is True
    assert rows[1]["cumulative_usd"] >= rows[0]["cumulative_usd"] > 0

    budget = found["factory-art-1-budget"]
    assert len(budget) == 3, "the budget artifact is updated at each iteration's first call and at the end"
    assert "$1.00" in budget[-1].data and "the job has stopped" in budget[-1].data
    assert "worst case of the next call" in budget[0].data

    progress = found["factory-art-1-progress"][-1]
    assert progress.type == "progress" and float(progress.data) == 100.0

    summary = found["factory-art-1-summary"][-1]
    assert "CONVERGED (CONFORMITY)" in summary.data and '"total_iterations": 2' in summary.data


async def test_progress_follows_the_budget_when_it_is_closer_to_the_end(factory_env):
    llm = factory_env
    llm.reset(Script(executor=["y" * 8000], verdicts=[NOT_YET]))
    state = await run_job(job_id="art-2", limits={"max_cycles": 50, "budget_usd": 0.2})
    found = await artifacts_of(state.state_details.flow_run_id)
    progress = found["factory-art-2-progress"][-1]
    assert float(progress.data) > 100 / 50 * 2, "after two iterations the budget share is the larger"
