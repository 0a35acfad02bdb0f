"""The judge step: the evaluator's verdict on one artifact (media shown as images), told the acceptance threshold,
the checks it passed and its own last verdicts; one repair call when its reply cannot be read."""

from __future__ import annotations

from decimal import Decimal

from prefect.logging import get_run_logger

from factory.checks import describe
from factory.errors import BudgetExceeded
from factory.eventlog import EventLog
from factory.models import Event, Verdict
from factory.preflight import JobPlan
from factory.prompts import (
    EVALUATOR_SYSTEM,
    REPAIR_INSTRUCTION,
    VERDICT_SCHEMA,
    VERDICT_TOOL,
    VERDICT_TOOL_DESCRIPTION,
    evaluator_prompt,
    user_message,
)
from factory.providers import ChatRequest, ImagePart, Message
from factory.settings import FactorySettings
from factory.verdict import UnreadableVerdict, parse_verdict, unparseable_verdict
from flows.steps.common import PaidCalls, Slot
from tasks.calls import CallResult
from tasks.evaluate import evaluate_artifact


def evaluator_request(plan: JobPlan, settings: FactorySettings, artifact: str, images: list[ImagePart],
                      history: list[tuple[int, Verdict]]) -> ChatRequest:
    """The evaluator's request for `artifact`, with `history`: its earlier verdicts by iteration number."""
    job = plan.job
    prompt = evaluator_prompt(job.objective, job.seed, artifact, plan.media_kind,
                              min_confidence=job.limits.min_confidence,
                              checks_passed=[describe(c) for c in job.checks], history=history)
    return ChatRequest(model=plan.evaluator.api_name, system=EVALUATOR_SYSTEM,
                       messages=[user_message(prompt, images, EVALUATOR_SYSTEM, plan.evaluator.price.min_cache_tokens,
                                              images_change=True)],
                       cache_key=f"{job.job_id}-evaluator",
                       max_tokens=settings.evaluator_max_tokens, response_schema=VERDICT_SCHEMA,
                       schema_name=VERDICT_TOOL, schema_description=VERDICT_TOOL_DESCRIPTION)


def evaluator_bound(plan: JobPlan, settings: FactorySettings, history: list[tuple[int, Verdict]]) -> Decimal:
    """The most judging one text candidate can cost: its artifact is at most the executor's output."""
    request = evaluator_request(plan, settings, "", [], history)
    return plan.evaluator.price.worst_case(request.input_token_bound() + settings.executor_max_tokens,
                                           request.max_tokens)


async def judge(calls: PaidCalls, log: EventLog, plan: JobPlan, n: int, slot: Slot, request: ChatRequest,
                held: Decimal = Decimal(0)) -> Verdict:
    """The verdict `request` asks for, priced and in the event log, with one repair if the reply is unreadable."""
    role = slot.role("evaluator")
    first = await calls.call(evaluate_artifact, Event.EVALUATOR_CALL, n, role, plan.evaluator, request, held=held)
    try:
        verdict = parse_verdict(first.reply.structured, first.reply.text)
    except UnreadableVerdict as exc:
        verdict = await _repair(calls, plan, n, role, request, first, str(exc))
    cost = calls.budget.spent_on(n, role)
    verdict = verdict.model_copy(update={"evaluator_model": first.reply.model, "cost_usd": float(cost)})
    await log.emit(Event.EVALUATOR_RESPONSE, iteration=n, **slot.fields, **verdict.model_dump())
    return verdict


async def _repair(calls: PaidCalls, plan: JobPlan, n: int, role: str, request: ChatRequest, first: CallResult,
                  error: str) -> Verdict:
    said = first.reply.text.strip() or str(first.reply.structured or "(an empty reply)")
    repair = request.model_copy(update={"messages": [
        *request.messages, Message(role="assistant", content=said),
        Message(role="user", content=REPAIR_INSTRUCTION.format(error=error))]})
    get_run_logger().warning("Iteration %d: evaluator reply unreadable (%s); asking once more.", n, error)
    try:
        second = await calls.call(evaluate_artifact, Event.EVALUATOR_CALL, n, f"{role}-repair", plan.evaluator,
                                  repair)
    except BudgetExceeded as exc:
        return unparseable_verdict(f"{error}; not asked again: {exc}")
    try:
        return parse_verdict(second.reply.structured, second.reply.text)
    except UnreadableVerdict as exc:
        return unparseable_verdict(f"{error}; after one repair: {exc}")
