"""`generate_artifact`: one executor call, cached per job, iteration and request."""

from __future__ import annotations

from prefect import task

from factory.pricing import Price
from factory.providers import ChatRequest
from tasks.calls import CallResult, billed_call, call_cache_key


@task(name="generate_artifact", cache_key_fn=call_cache_key, persist_result=True,
      task_run_name="generate-{job_id}-{iteration}")
async def generate_artifact(
    job_id: str, iteration: int, role: str, provider: str, request: ChatRequest, price: Price, deadline: float
) -> CallResult:
    """Ask the executor for iteration `iteration`'s artifact.

    Args:
        job_id, iteration, role: name the call in the cache key and the UI.
        provider: from `factory.providers.provider_name`.
        request: the full prompt and limits; all of it keys the cache.
        price: what the model costs, to price the reply's usage.
        deadline: epoch seconds after which no call is made.

    Returns:
        The reply and its CallRecord (tokens, exact cost, duration).
    """
    return await billed_call(provider, request, price, deadline, role)
