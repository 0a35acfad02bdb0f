"""Money and time at the edges, through a real Prefect server and the provider emulators: replies that bill and
then break, replies without usage, attempts checked one by one against the budget, a deadline that is hard."""

from __future__ import annotations

import asyncio
import math
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from factory.models import JobResult, JobStatus, StopReason
from factory.pricing import price_table
from factory.settings import get_settings
from factory.storage import get_storage
from tests.conftest import reset_settings
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, read_log, run_job

LOCAL_MODEL = "openai:local-llm"
LOCAL_PRICE = '{"openai:local-llm": {"input": 1.0, "output": 2.0}}'
JOB_BOUND_S = 120  # no test here may take longer: a call that outlived its bound would hang it


def readable_cost(llm) -> Decimal:
    """What the emulator billed for the replies whose usage the client could read, at the Factory's prices."""
    table = price_table(get_settings())
    return sum((
        (Decimal(b.input_tokens) * table[b.model].input + Decimal(b.output_tokens) * table[b.model].output
         + Decimal(b.cache_read_tokens) * (table[b.model].cache_read or table[b.model].input)) / Decimal(1_000_000)
        for b in llm.billed if b.usage_known), Decimal(0))


def worst_cases(log_ref: str) -> list[Decimal]:
    """The worst case announced before each call, in order (EXECUTOR_CALL / EVALUATOR_CALL)."""
    return [Decimal(str(e["data"]["worst_case_usd"])) for e in read_log(log_ref)
            if e["event"] in ("EXECUTOR_CALL", "EVALUATOR_CALL")]


def charged_calls(log_ref: str) -> list[dict]:
    return [c for e in read_log(log_ref) if e["event"] == "ITERATION_END" for c in e["data"]["calls"]]


def assert_adds_up(result: JobResult) -> None:
    parts = sum(Decimal(str(d.cost_usd)) for d in result.iterations_detail) + Decimal(str(result.other_cost_usd))
    assert abs(parts - Decimal(str(result.total_cost_usd))) < Decimal("1e-12")


async def finished(job_id: str | None = None, **params) -> JobResult:
    """Run a job to its end and return its JobResult: the run's result, or for a failed run the one it wrote."""
    job_id = job_id or f"money-{uuid.uuid4().hex[:10]}"
    state = await asyncio.wait_for(run_job(job_id=job_id, **params), JOB_BOUND_S)
    if state.is_failed():
        assert "Result: " in state.message, state.message
        return JobResult.model_validate_json((get_storage().root / job_id / "result.json").read_bytes())
    return await state.result()


@pytest.fixture
def local_model(factory_env, monkeypatch):
    monkeypatch.setenv("FACTORY_PRICES", LOCAL_PRICE)
    reset_settings()
    yield factory_env
    reset_settings()


async def test_replies_without_usage_are_charged_their_worst_case_and_the_budget_binds(local_model):
    llm = local_model
    llm.reset(Script(verdicts=[NOT_YET], omit_usage=True))
    result = await finished(executor_model=LOCAL_MODEL, evaluator_model=LOCAL_MODEL,
                            limits={"budget_usd": 0.1, "max_cycles": 50})
    assert result.stop_reason is StopReason.BUDGET, "a server that reports no usage must not be free"
    assert 0 < result.total_cost_usd <= 0.1
    assert Decimal(str(result.total_cost_usd)) == sum(worst_cases(result.log_ref)), \
        "each call is charged the worst case announced before it"
    assert result.iterations_detail and not any(d.usage_known for d in result.iterations_detail)
    assert all(not c["usage_known"] for c in charged_calls(result.log_ref))
    assert_adds_up(result)


async def test_replies_that_billed_and_then_broke_are_counted(factory_env):
    llm = factory_env
    # The first executor reply is garbled (billed, usage unreadable), the second has no `content` (billed, usage
    # readable); the third answers.
    llm.reset(Script(verdicts=[DONE], faults=["malformed", "no_content"]))
    result = await finished()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 1
    assert len(llm.billed) == 4, "three executor replies and a verdict were billed"
    [detail] = result.iterations_detail
    assert detail.usage_known is False
    executor_worst = worst_cases(result.log_ref)[0]
    assert Decimal(str(result.total_cost_usd)) == readable_cost(llm) + executor_worst
    assert Decimal(str(result.total_cost_usd)) >= readable_cost(llm)
    calls = charged_calls(result.log_ref)
    assert [c["failed"] is not None for c in calls] == [True, True, False, False]
    assert_adds_up(result)


async def test_every_attempt_is_checked_against_the_budget(factory_env, monkeypatch):
    llm = factory_env
    monkeypatch.setenv("FACTORY_EXECUTOR_MAX_TOKENS", "3000")
    reset_settings()
    llm.reset(Script(faults=["malformed"] * 20))
    result = await finished(limits={"budget_usd": 0.1})
    worst = worst_cases(result.log_ref)[0]
    assert result.stop_reason is StopReason.BUDGET and result.total_cost_usd <= 0.1
    assert len(llm.requests) == math.floor(Decimal("0.1") / worst), "each retry was checked before it was made"
    assert Decimal(str(result.total_cost_usd)) == worst * len(llm.requests)
    assert result.total_iterations == 0 and result.other_cost_usd == result.total_cost_usd
    assert_adds_up(result)


async def test_a_reply_that_trickles_in_is_cut_at_the_call_bound(factory_env, monkeypatch):
    llm = factory_env
    monkeypatch.setenv("FACTORY_REQUEST_TIMEOUT_S", "2")
    reset_settings()
    llm.reset(Script(verdicts=[DONE], faults=["trickle"], trickle_s=0.5))  # a byte every 0.5 s: minutes in all
    result = await finished()
    assert result.stop_reason is StopReason.CONFORMITY
    assert llm.trickles_finished == 0, "the trickling reply was abandoned, not waited out"
    assert Decimal(str(result.total_cost_usd)) == readable_cost(llm) + worst_cases(result.log_ref)[0]
    assert "took longer than 2.0 s" in charged_calls(result.log_ref)[0]["failed"]


async def test_a_retry_wait_past_the_deadline_stops_the_job_with_timeout(factory_env, monkeypatch):
    llm = factory_env
    monkeypatch.setenv("FACTORY_RETRY_AFTER_CAP_S", "3600")
    reset_settings()
    llm.reset(Script(faults=["429"], retry_after="3600"))
    result = await finished(limits={"timeout_minutes": 1})
    assert result.stop_reason is StopReason.TIMEOUT and result.status is JobStatus.EXHAUSTED
    assert len(llm.requests) == 1 and "would pass the job's deadline" in result.error
    assert read_log(result.log_ref)[-1]["event"] == "JOB_COMPLETED"
    assert (Path(result.log_ref).parent / "result.json").exists()


async def test_a_reply_without_content_is_never_cached(factory_env):
    llm = factory_env
    attempts = get_settings().retries + 1
    llm.reset(Script(faults=["no_content"] * attempts))
    failed = await finished(job_id="no-content-1")
    assert failed.status is JobStatus.FAILED and failed.stop_reason is StopReason.ERROR
    assert "no `content`" in failed.error and len(llm.requests) == attempts
    assert Decimal(str(failed.total_cost_usd)) == readable_cost(llm) > 0, "each billed attempt is counted"
    llm.reset(Script(verdicts=[DONE]))
    again = await finished(job_id="no-content-1")
    assert again.stop_reason is StopReason.CONFORMITY
    assert len(llm.requests) == 2, "the re-run made the call again instead of reading a broken reply from the cache"
