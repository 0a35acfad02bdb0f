"""The retry layer on its own, in milliseconds: each attempt checked, each billed attempt charged, waits bounded."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from factory.budget import Budget
from factory.errors import BudgetExceeded, DeadlineExceeded, ProviderRequestError, TransientProviderError
from factory.models import Usage
from factory.pricing import Price
from tasks.retry import Allowance, Call, with_retries

pytestmark = pytest.mark.fast

PRICE = Price(input=Decimal(1), output=Decimal(2))
CALL = Call(iteration=3, role="executor", model="m", provider="anthropic")
USED = Usage(input_tokens=1000, output_tokens=500)  # $0.002 at PRICE


def scripted(*outcomes):
    """An attempt that raises or returns each outcome in turn, and counts its calls."""
    calls = []

    async def attempt(timeout_s: float):
        calls.append(timeout_s)
        outcome = outcomes[min(len(calls), len(outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "hang":
            await asyncio.sleep(3600)
        return "made", outcome

    return attempt, calls


def allowance(limit: float = 1.0, worst: str = "0.01", deadline_s: float = 60) -> Allowance:
    return Allowance(budget=Budget(limit), price=PRICE, worst=Decimal(worst), deadline=time.time() + deadline_s)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    from tests.conftest import reset_settings

    monkeypatch.setenv("FACTORY_RETRY_DELAY_S", "0")
    monkeypatch.setenv("FACTORY_RETRIES", "3")
    reset_settings()
    yield
    reset_settings()


async def test_billed_failures_are_charged_and_the_success_last():
    attempt, calls = scripted(TransientProviderError("m", "garbled", billed_unknown=True),
                              TransientProviderError("m", "no content", billed=USED),
                              TransientProviderError("m", "429"), USED)
    given = allowance()
    value, records = await with_retries(attempt, CALL, given)
    assert value == "made" and len(calls) == 4
    assert [r.cost_usd for r in records] == [Decimal("0.01"), Decimal("0.002"), Decimal("0.002")]
    assert [r.usage_known for r in records] == [False, True, True]
    assert records[0].failed and records[1].failed and records[2].failed is None
    assert given.budget.spent == Decimal("0.014") and all(r.iteration == 3 for r in records)


async def test_a_reply_without_usage_is_charged_the_worst_case():
    attempt, _ = scripted(None)
    value, [record] = await with_retries(attempt, CALL, given := allowance(worst="0.05"))
    assert record.cost_usd == Decimal("0.05") and not record.usage_known and given.budget.spent == Decimal("0.05")


async def test_each_attempt_is_checked_against_what_is_left():
    attempt, calls = scripted(TransientProviderError("m", "garbled", billed_unknown=True))
    given = allowance(limit=0.1, worst="0.04")
    with pytest.raises(BudgetExceeded, match="the executor call of iteration 3"):
        await with_retries(attempt, CALL, given)
    assert len(calls) == 2 and given.budget.spent == Decimal("0.08") <= given.budget.limit


async def test_errors_not_worth_retrying_are_raised_at_once_and_still_charged():
    attempt, calls = scripted(ProviderRequestError("m", "GPU flow run failed", billed=USED))
    given = allowance()
    with pytest.raises(ProviderRequestError):
        await with_retries(attempt, CALL, given)
    assert len(calls) == 1 and given.budget.spent == Decimal("0.002")


async def test_an_attempt_is_cut_at_the_time_left_and_charged_as_maybe_billed():
    attempt, calls = scripted("hang")
    given = allowance(deadline_s=0.3)
    with pytest.raises(DeadlineExceeded, match="deadline"):
        await asyncio.wait_for(with_retries(attempt, CALL, given), 10)
    assert calls[0] <= 0.3 and given.budget.spent == Decimal("0.01")


async def test_a_wait_that_would_pass_the_deadline_is_not_waited():
    attempt, calls = scripted(TransientProviderError("m", "429", retry_after_s=30))
    with pytest.raises(DeadlineExceeded, match="would pass the job's deadline"):
        await asyncio.wait_for(with_retries(attempt, CALL, allowance(deadline_s=5)), 2)
    assert len(calls) == 1


async def test_retries_stop_after_the_configured_number():
    attempt, calls = scripted(TransientProviderError("m", "500"))
    with pytest.raises(TransientProviderError, match="500"):
        await with_retries(attempt, CALL, allowance())
    assert len(calls) == 4
