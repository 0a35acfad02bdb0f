"""The executor step of a TEXT or CODE job: one chat call, rendered and stored as the iteration's artifact."""

from __future__ import annotations

from decimal import Decimal

from factory.artifacts import render
from factory.models import Event, IterationOutput
from factory.preflight import JobPlan
from factory.prompts import EXECUTOR_SYSTEM, Revision, as_candidate, executor_prompt, user_message
from factory.providers import ChatRequest
from factory.settings import FactorySettings
from flows.steps.common import Made, PaidCalls, Slot
from tasks.generate import generate_artifact
from tasks.store import store_artifact


def executor_request(plan: JobPlan, settings: FactorySettings, revision: Revision | None, slot: Slot) -> ChatRequest:
    """The executor's request for `slot`: the stable prompt (seed, objective, inputs) first, then what to revise."""
    inputs, job = plan.inputs, plan.job
    prompt = as_candidate(executor_prompt(job.seed, job.objective, job.function,
                                          [(i.ref, i.text) for i in inputs if i.text is not None],
                                          [i.ref for i in inputs if i.image is not None], revision),
                          slot.k, slot.count)
    images = [i.image for i in inputs if i.image is not None]
    return ChatRequest(model=plan.executor.api_name, system=EXECUTOR_SYSTEM,
                       messages=[user_message(prompt, images, EXECUTOR_SYSTEM, plan.executor.price.min_cache_tokens)],
                       max_tokens=settings.executor_max_tokens, cache_key=f"{job.job_id}-executor")


async def make_text(calls: PaidCalls, plan: JobPlan, n: int, slot: Slot, request: ChatRequest,
                    held: Decimal = Decimal(0)) -> Made:
    """Make iteration `n`'s artifact for `slot` and store it as `iteration-NN[-cK].<ext>`."""
    generated = await calls.call(generate_artifact, Event.EXECUTOR_CALL, n, slot.role("executor"), plan.executor,
                                 request, held=held)
    text, extension = render(plan.job.function, generated.reply.text)
    location = plan.artifact_dir.child(f"iteration-{n:02d}{slot.suffix}{extension}")
    digest = await store_artifact(location, text.encode())
    output = IterationOutput(artifact_ref=location.ref, artifact_hash=digest, executor_model=generated.reply.model,
                             cost_usd=float(sum(c.cost_usd for c in generated.calls)),
                             tokens_used=generated.call.usage.total,
                             metadata={"stop_reason": generated.reply.stop_reason,
                                       "usage_known": generated.call.usage_known,
                                       **generated.call.usage.model_dump()})
    return Made(text, text.encode(), extension, location, output)
