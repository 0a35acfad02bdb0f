"""Provider limits shared by every worker: Prefect's global concurrency limits, one slot per provider call.

With FACTORY_PROVIDER_LIMITS on, each attempt at a provider call first takes one slot of the rate limit
`factory-<provider>-per-minute` and holds one of `factory-<provider>` (calls in flight) while it runs; a limit
the operator did not create is no limit. A hundred jobs then queue for a provider instead of storming it into
429s, and the UI's Concurrency page shows the slots in use. The wait is bounded by the job's deadline and
costs no money: a call that finds no slot in time stops the job with TIMEOUT.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from prefect.concurrency.asyncio import concurrency, rate_limit

from factory.errors import DeadlineExceeded
from factory.settings import get_settings


def limit_names(provider: str) -> tuple[str, str]:
    """The global concurrency limit (calls in flight) and rate limit (calls per minute) of `provider`."""
    return f"factory-{provider}", f"factory-{provider}-per-minute"


@asynccontextmanager
async def provider_slot(provider: str, what: str, deadline: float) -> AsyncIterator[float]:
    """Hold a slot of `provider`'s shared limits for one attempt, waiting at most until `deadline`; yields the
    seconds it waited.

    Raises:
        DeadlineExceeded: no slot came free before the job's deadline.
    """
    if not get_settings().provider_limits:
        yield 0.0
        return
    in_flight, per_minute = limit_names(provider)
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        try:
            await rate_limit(per_minute, timeout_seconds=_left(deadline, what))
            await stack.enter_async_context(concurrency(in_flight, timeout_seconds=_left(deadline, what)))
        except TimeoutError as exc:
            raise DeadlineExceeded(f"{what} waited {time.monotonic() - started:.0f} s for a free slot of the "
                                   f"{provider} limits ({in_flight}, {per_minute}) and ran into the job's "
                                   f"deadline") from exc
        yield time.monotonic() - started


def _left(deadline: float, what: str) -> float:
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded(f"the job's deadline passed before {what}")
    return left
