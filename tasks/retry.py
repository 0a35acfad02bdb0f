"""The one retry layer: each paid task retries its own call, on transient provider faults only.

SDK clients are built with `max_retries=0`, so a fault is retried here and nowhere else. Each attempt
is checked against the budget before it is made and bounded as a whole by the time left; an attempt that
failed after it was billed is charged (its worst case when its usage is unknown); the wait before the next
attempt (the provider's `retry-after`, capped by `FACTORY_RETRY_AFTER_CAP_S`, or exponential backoff from
`FACTORY_RETRY_DELAY_S` with jitter) never runs past the job's deadline. Auth and request errors, budget
and deadline stops are never retried. Each attempt holds a slot of its provider's shared limits, where the
operator turned them on (tasks/limits.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from factory.budget import Budget
from factory.errors import DeadlineExceeded, ProviderError, TransientProviderError
from factory.models import CallRecord, Usage
from factory.pricing import Price
from factory.settings import FactorySettings, get_settings
from tasks.limits import provider_slot

JITTER_FACTOR = 0.5
SLOW_SLOT_S = 1.0  # a wait for a provider slot longer than this is said in the run's log
MAX_BACKOFF_S = 60.0

R = TypeVar("R")
# One attempt: given the seconds it may take, its value and the usage it was billed (None: the reply did not say).
Attempt = Callable[[float], Awaitable[tuple[R, Usage | None]]]


@dataclass(frozen=True)
class Allowance:
    """What one paid call may spend and how long it may take. Handed to the task, left out of its cache key."""

    budget: Budget
    price: Price
    worst: Decimal
    deadline: float = float("inf")
    held: Decimal = Decimal(0)  # this call's share of a hold (candidates run at once): it may spend into it


@dataclass(frozen=True)
class Call:
    """Names one paid call: it keys its records and its messages."""

    iteration: int
    role: str
    model: str
    provider: str  # whose shared limits the call takes a slot of (tasks/limits.py)

    @property
    def what(self) -> str:
        return f"the {self.role} call of iteration {self.iteration}"


async def with_retries(attempt: Attempt[R], call: Call, allowance: Allowance,
                       bound_s: float | None = None) -> tuple[R, list[CallRecord]]:
    """Make `attempt` until it succeeds, retrying transient faults; charge every billed attempt to the budget.

    Args:
        bound_s: the longest one attempt may take (default FACTORY_REQUEST_TIMEOUT_S), cut to the time left.

    Returns:
        The value, and the records of every billed attempt (the successful one last), all charged.

    Raises:
        BudgetExceeded: an attempt's worst case no longer fits; nothing more is spent.
        DeadlineExceeded: no time is left for an attempt, or for the wait before the next one.
        ProviderError: a fault not worth retrying, or a transient one past FACTORY_RETRIES.
    """
    settings = get_settings()
    records: list[CallRecord] = []
    for number in range(1, settings.retries + 2):
        allowance.budget.check(allowance.worst, call.what, allowance.held)
        try:
            async with provider_slot(call.provider, call.what, allowance.deadline) as waited:
                if waited >= SLOW_SLOT_S:
                    _logger().info("%s waited %.1f s for a slot of the shared %s limits.", call.what.capitalize(),
                                   waited, call.provider)
                timeout = time_left(allowance.deadline, call, bound_s)
                started = time.perf_counter()
                value, usage = await _bounded(attempt, timeout, call)
        except ProviderError as exc:
            if exc.billed is not None or exc.billed_unknown:
                records.append(_charge(allowance, call, exc.billed, started, failed=str(exc)))
            if time.time() >= allowance.deadline:
                raise DeadlineExceeded(f"{call.what} ran into the job's deadline ({exc})") from exc
            if not isinstance(exc, TransientProviderError) or number > settings.retries:
                raise
            await _wait_before_retry(exc, number, call, allowance, settings)
            continue
        records.append(_charge(allowance, call, usage, started))
        return value, records
    raise AssertionError("unreachable: the last attempt returns or raises")


def time_left(deadline: float, call: Call, bound_s: float | None = None) -> float:
    """Seconds one attempt may take: `bound_s` (default: the provider timeout), or less when the deadline is nearer.

    Raises:
        DeadlineExceeded: no time is left.
    """
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded(f"the job's deadline passed before {call.what}")
    return min(get_settings().request_timeout_s if bound_s is None else bound_s, left)


async def _bounded(attempt: Attempt[R], timeout: float, call: Call) -> tuple[R, Usage | None]:
    """One attempt, cut at `timeout` in all: a reply that trickles in never outlives it. A request that was sent
    and never answered may have been billed, so it is charged its worst case."""
    try:
        async with asyncio.timeout(timeout):
            return await attempt(timeout)
    except TimeoutError as exc:
        raise TransientProviderError(call.model, f"{call.what} took longer than {timeout:.1f} s",
                                     billed_unknown=True) from exc


def _charge(allowance: Allowance, call: Call, usage: Usage | None, started: float,
            failed: str | None = None) -> CallRecord:
    cost = allowance.price.cost(usage) if usage is not None else allowance.worst
    record = CallRecord(iteration=call.iteration, role=call.role, model=call.model, usage=usage or Usage(),
                        cost_usd=cost, duration_ms=int((time.perf_counter() - started) * 1000),
                        usage_known=usage is not None, failed=failed)
    allowance.budget.charge(record)
    if usage is None:
        _logger().warning("%s reported no usage: charged its worst case, $%.6f.", call.what.capitalize(), cost)
    return record


async def _wait_before_retry(exc: TransientProviderError, number: int, call: Call, allowance: Allowance,
                             settings: FactorySettings) -> None:
    backoff = min(MAX_BACKOFF_S, settings.retry_delay_s * 2 ** (number - 1)) * (1 + random.uniform(0, JITTER_FACTOR))
    wait = max(backoff, min(exc.retry_after_s or 0.0, settings.retry_after_cap_s))
    if time.time() + wait >= allowance.deadline:
        raise DeadlineExceeded(f"{call.what} failed ({exc}) and the wait before trying again ({wait:.1f} s) "
                               f"would pass the job's deadline") from exc
    _logger().warning("%s failed (%s); attempt %d of %d in %.1f s.", call.what.capitalize(), exc, number + 1,
                   settings.retries + 1, wait)
    await asyncio.sleep(wait)


def _logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """The task run's logger (its lines show in the UI), or the module's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
