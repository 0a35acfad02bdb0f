"""`generate_artifact`: one executor call, cached per job, iteration and request."""

from __future__ import annotations

from prefect import task

from factory.providers import ChatRequest
from tasks.calls import CallResult, billed_call, call_cache_key
from tasks.retry import Allowance, Call


@task(name="generate_artifact", cache_key_fn=call_cache_key, persist_result=True,
      task_run_name="generate-{job_id}-{iteration}-{role}")
async def generate_artifact(
    job_id: str, iteration: int, role: str, provider: str, request: ChatRequest, allowance: Allowance
) -> CallResult:
    """Ask the executor for iteration `iteration`'s artifact.

    Args:
        job_id, iteration, role: name the call in the cache key and the UI.
        provider: from `factory.providers.provider_name`.
        request: the full prompt and limits; all of it keys the cache.
        allowance: the job's budget, the model's price, the call's worst case and the job's deadline.

    Returns:
        The reply and the CallRecords of its billed attempts (tokens, exact cost, duration).
    """
    return await billed_call(provider, request, Call(iteration, role, request.model, provider), allowance)
