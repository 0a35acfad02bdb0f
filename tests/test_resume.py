"""Nothing is lost: a failed job re-run with its job_id resumes from the cache; secrets never leak."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from factory.models import JobResult, StopReason
from tests.emulators.llm import API_KEY, Script
from tests.helpers import DONE, NOT_YET, event_names, run_job


async def test_failed_job_resumes_from_its_cache(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET, DONE], faults=[None, None, "400"]))
    failed = await run_job(job_id="resume-1")
    assert failed.is_failed() and "HTTP 400" in failed.message
    assert "result.json" in failed.message and "log.json" in failed.message
    billed_first = len(llm.billed)
    assert billed_first == 2  # iteration 1's executor and evaluator

    llm.reset(Script(verdicts=[DONE]))
    result: JobResult = await (await run_job(job_id="resume-1")).result()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 2
    assert len(llm.billed) == 2, "iteration 1 must come from the cache, only iteration 2 is paid"
    names = event_names(result.log_ref)
    assert names.count("JOB_ERROR") == 1 and names.count("JOB_CREATED") == 2, "the log keeps both runs"


async def test_api_key_never_appears_in_logs_results_or_files(factory_env, storage_root: Path):
    llm = factory_env
    llm.reset(Script(faults=[None, "401"]))
    state = await run_job(job_id="secret-1")
    assert state.is_failed()
    run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    async with get_client() as client:
        for _ in range(50):  # logs reach the API in batches
            logs = await client.read_logs(run_filter)
            if any("refused" in log.message for log in logs):
                break
            await asyncio.sleep(0.2)
    assert any("refused" in log.message for log in logs), "the run's logs should have reached the API"
    texts = [log.message for log in logs] + [state.message or ""]
    texts += [p.read_text() for p in (storage_root / "secret-1").rglob("*") if p.is_file()]
    assert not any(API_KEY in text for text in texts)


async def test_an_unexpected_failure_still_closes_the_log(factory_env, monkeypatch, storage_root):
    import flows.steps.text

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(flows.steps.text, "render", broken)
    state = await run_job(job_id="bug-1")
    assert state.is_failed()
    names = event_names(storage_root / "bug-1" / "log.json")
    assert names[-2:] == ["JOB_ERROR", "JOB_COMPLETED"]
