"""The loop against the emulated providers, through a real Prefect server: stop reasons and money."""

from __future__ import annotations

import hashlib
import time
from decimal import Decimal
from pathlib import Path

from factory.models import JobResult, JobStatus, StopReason
from tests.conftest import billed_cost
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, event_names, read_log, run_job


async def test_converges_on_iteration_three_with_exact_cost(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET, {**NOT_YET, "confidence": 0.6}, DONE]))
    state = await run_job()
    result: JobResult = await state.result()
    assert result.status is JobStatus.CONVERGED and result.stop_reason is StopReason.CONFORMITY
    assert result.converged and result.total_iterations == 3
    assert [d.iteration for d in result.iterations_detail] == [1, 2, 3]
    assert result.final_artifact_ref == result.iterations_detail[-1].artifact_ref
    assert result.last_functional_iteration == 3
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm)
    assert len(llm.billed) == 6
    assert abs(sum(d.cost_usd for d in result.iterations_detail) - result.total_cost_usd) < 1e-12
    final = Path(result.final_artifact_ref)
    assert final.suffix == ".md" and final.read_text() == "Draft 3: an artifact."
    assert result.created_at.tzinfo is not None and result.completed_at >= result.started_at
    names = event_names(result.log_ref)
    assert names[:2] == ["JOB_CREATED", "JOB_STARTED"]
    assert names.count("ITERATION_START") == 3 and names.count("EVALUATOR_RESPONSE") == 3
    assert names[-2:] == ["JOB_CONVERGED", "JOB_COMPLETED"]
    responses = [e for e in read_log(result.log_ref) if e["event"] == "EXECUTOR_RESPONSE"]
    assert responses[0]["data"]["artifact_hash"] == hashlib.sha256(b"Draft 1: an artifact.").hexdigest()
    assert all(e["timestamp"].endswith("+00:00") for e in read_log(result.log_ref))


async def test_executor_revises_previous_artifact_with_feedback(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET, DONE]))
    await run_job()
    executor_calls = [r["body"] for r in llm.requests if not r["body"].get("tools")]
    second = executor_calls[1]["messages"][0]["content"]
    assert "Draft 1: an artifact." in second and "Make it longer." in second and "too short" in second
    evaluator_prompt = next(r["body"] for r in llm.requests if r["body"].get("tools"))["messages"][0]["content"]
    assert "<<<ARTIFACT" in evaluator_prompt and "<<<END ARTIFACT" in evaluator_prompt


async def test_max_cycles_names_best_judged_iteration(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[{**NOT_YET, "confidence": 0.3}, {**NOT_YET, "confidence": 0.7},
                               {**NOT_YET, "confidence": 0.5}]))
    result: JobResult = await (await run_job(limits={"max_cycles": 3})).result()
    assert result.status is JobStatus.EXHAUSTED and result.stop_reason is StopReason.MAX_CYCLES
    assert result.total_iterations == 3 and not result.converged
    assert result.final_artifact_ref == result.iterations_detail[1].artifact_ref
    assert result.last_functional_iteration is None
    assert "JOB_MAX_ITERATIONS" in event_names(result.log_ref)


async def test_converged_below_min_confidence_keeps_going(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[{**DONE, "confidence": 0.7}, {**DONE, "confidence": 0.95}]))
    result: JobResult = await (await run_job(limits={"min_confidence": 0.9})).result()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 2


async def test_budget_is_a_ceiling_never_crossed(factory_env):
    llm = factory_env
    # ~5,000 output tokens per executor call at $10/MTok: $0.05 each against a $0.10 budget.
    llm.reset(Script(executor=["x" * 20_000], verdicts=[NOT_YET]))
    result: JobResult = await (await run_job(limits={"budget_usd": 0.1, "max_cycles": 10})).result()
    assert result.status is JobStatus.EXHAUSTED and result.stop_reason is StopReason.BUDGET
    assert result.total_cost_usd <= 0.1
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm)
    assert result.total_iterations == 1, "the paid-for artifact is kept, marked as not judged"
    assert result.final_artifact_ref == result.iterations_detail[0].artifact_ref
    assert "could cost up to" in result.error
    assert len(llm.requests) == 1, "the evaluator call that could not fit was never made"
    assert "JOB_BUDGET_EXHAUSTED" in event_names(result.log_ref)


async def test_transient_faults_still_converge_with_exact_cost(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET, NOT_YET, DONE], fault_rate=0.3, fault_seed=13))
    result: JobResult = await (await run_job()).result()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 3
    assert len(llm.faults_sent) >= 2, "the seed should inject several faults"
    assert set(llm.faults_sent) <= {"429", "500", "529", "malformed"}
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm)
    assert len(llm.billed) == 6


async def test_auth_error_fails_fast_without_retries(factory_env, monkeypatch):
    llm = factory_env
    llm.reset(Script(faults=["401"]))
    started = time.monotonic()
    state = await run_job()
    assert state.is_failed()
    assert "API key was refused" in state.message
    assert len(llm.requests) == 1, "an auth error must not be retried"
    assert time.monotonic() - started < 30


async def test_rerun_with_same_job_id_makes_zero_calls(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET, DONE]))
    first: JobResult = await (await run_job(job_id="rerun-job-1")).result()
    calls_before = len(llm.requests)
    second: JobResult = await (await run_job(job_id="rerun-job-1")).result()
    assert len(llm.requests) == calls_before, "a finished job re-run must make no provider call"
    assert second.total_cost_usd == first.total_cost_usd > 0
    assert second.final_artifact_ref == first.final_artifact_ref
    assert second.status is JobStatus.CONVERGED


async def test_openai_models_with_cached_tokens_priced_exactly(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET, DONE], cached_tokens=40))
    result: JobResult = await (await run_job(executor_model="gpt-5.4-mini", evaluator_model="gpt-5.4")).result()
    assert result.stop_reason is StopReason.CONFORMITY
    assert {r["api"] for r in llm.requests} == {"openai"}
    assert all(b.cache_read_tokens == 40 for b in llm.billed)
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm)
    evaluator = next(r["body"] for r in llm.requests if r["body"].get("response_format"))
    assert evaluator["response_format"]["type"] == "json_schema"
    assert "max_completion_tokens" in evaluator


async def test_timeout_stops_at_the_deadline(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET], faults=[None, None, "hang"], hang_s=120))
    started = time.monotonic()
    result: JobResult = await (await run_job(limits={"timeout_minutes": 1})).result()
    elapsed = time.monotonic() - started
    assert result.stop_reason is StopReason.TIMEOUT and result.status is JobStatus.EXHAUSTED
    assert result.total_iterations == 1
    assert elapsed < 90, f"the deadline must bound the hanging call (took {elapsed:.0f}s)"
    assert event_names(result.log_ref)[-1] == "JOB_COMPLETED"


async def test_rate_limit_waits_out_retry_after_and_is_retried_once(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[DONE], faults=["429"], retry_after="1.5"))
    result: JobResult = await (await run_job()).result()
    assert result.stop_reason is StopReason.CONFORMITY
    first, second = llm.requests[0], llm.requests[1]
    assert second["at"] - first["at"] >= 1.5, "the retry must not come before retry-after"
    assert len(llm.requests) == 3 and len(llm.billed) == 2
    assert all(r["headers"].get("x-stainless-retry-count", "0") == "0" for r in llm.requests), \
        "the SDK must not retry on its own: the task is the one retry layer"
