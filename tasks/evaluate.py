"""`evaluate_artifact`: one evaluator call, cached like generation; parsing is the flow's."""

from __future__ import annotations

from prefect import task

from factory.providers import ChatRequest
from tasks.calls import CallResult, billed_call, call_cache_key
from tasks.retry import Allowance, Call


@task(name="evaluate_artifact", cache_key_fn=call_cache_key, persist_result=True,
      task_run_name="evaluate-{job_id}-{iteration}-{role}")
async def evaluate_artifact(
    job_id: str, iteration: int, role: str, provider: str, request: ChatRequest, allowance: Allowance
) -> CallResult:
    """Ask the evaluator for a verdict (role `evaluator`) or for a readable one again (`evaluator-repair`).

    Returns:
        The reply (its tool input or text, for `factory.verdict.parse_verdict`) and its CallRecord.
    """
    return await billed_call(provider, request, Call(iteration, role, request.model, provider), allowance)
