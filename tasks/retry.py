"""The one retry layer: Prefect task retries, on transient provider faults only.

SDK clients are built with `max_retries=0`, so a fault is retried here and nowhere else.
Delays grow exponentially from `FACTORY_RETRY_DELAY_S` with Prefect's jitter; a
`retry-after` the provider sent is waited out first (capped by `FACTORY_RETRY_AFTER_CAP_S`).
Auth and request errors, budget and deadline stops are never retried.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect.tasks import exponential_backoff

from factory.errors import TransientProviderError
from factory.settings import get_settings

JITTER_FACTOR = 0.5


async def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only TransientProviderError, after its retry-after."""
    exc = await state.aresult(raise_on_failure=False)
    if not isinstance(exc, TransientProviderError):
        return False
    if exc.retry_after_s:
        await asyncio.sleep(min(exc.retry_after_s, get_settings().retry_after_cap_s))
    return True


def retry_options() -> dict[str, Any]:
    """Task options for the paid tasks, read from settings when the flow starts."""
    settings = get_settings()
    return {
        "retries": settings.retries,
        "retry_delay_seconds": exponential_backoff(settings.retry_delay_s) if settings.retry_delay_s else 0,
        "retry_jitter_factor": JITTER_FACTOR,
        "retry_condition_fn": retry_transient,
    }
