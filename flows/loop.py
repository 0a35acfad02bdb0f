"""The Factory loop: generate -> store -> evaluate, until conformity or a limit.

Each paid call is a cached, retryable Prefect task; the budget is checked against the call's
worst case *before* it is made; the deadline bounds every call; the event log is written as
the job goes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from factory.budget import Budget
from factory.checks import CheckResult, all_passed
from factory.errors import BudgetExceeded, DeadlineExceeded, JobFailed, ProviderError, StorageError
from factory.eventlog import EventLog
from factory.models import (
    CandidateDetail,
    Event,
    IterationDetail,
    JobResult,
    StopReason,
    TokenTotals,
    Verdict,
    utcnow,
)
from factory.preflight import JobPlan
from factory.prompts import Revision
from factory.providers import DRY_RUN_MODEL, ChatRequest
from factory.settings import FactorySettings
from factory.storage import get_storage
from factory.verdict import checks_failed_verdict, unjudged_verdict
from flows.report import JobReport
from flows.steps.check import check
from flows.steps.common import Made, PaidCalls, Slot
from flows.steps.judge import evaluator_bound, evaluator_request, judge
from flows.steps.media import make_media
from flows.steps.text import executor_request, make_text
from tasks.store import store_artifact

# Who wants to hear of each finished iteration in this context (the RunPod handler's progress_update).
progress_listener: ContextVar[Callable[[dict[str, Any]], None] | None] = ContextVar("progress_listener", default=None)

# What the event log says of each billed call at the end of its iteration.
CALL_FIELDS = {"role", "model", "cost_usd", "usage_known", "failed"}
STOP_EVENTS = {
    StopReason.CONFORMITY: Event.JOB_CONVERGED,
    StopReason.MAX_CYCLES: Event.JOB_MAX_ITERATIONS,
    StopReason.BUDGET: Event.JOB_BUDGET_EXHAUSTED,
    StopReason.ERROR: Event.JOB_ERROR,
    StopReason.PLATEAU: Event.JOB_PLATEAU,
}


def standing(checks: list[CheckResult], verdict: Verdict) -> tuple[bool, bool, float]:
    """How an artifact ranks against another: checks passed, then converged, then confidence."""
    return all_passed(checks), verdict.converged, verdict.confidence


@dataclass
class Outcome:
    """One artifact of an iteration, checked and judged (or not, where `error` says why)."""

    slot: Slot
    made: Made
    checks: list[CheckResult]
    verdict: Verdict
    error: Exception | None = None

    @property
    def rank(self) -> tuple[bool, bool, float]:
        return standing(self.checks, self.verdict)


@dataclass
class Iteration:
    """A finished iteration: the outcome it carries forward (the best of its candidates) and what it cost."""

    number: int
    chosen: Outcome
    cost: Decimal
    duration_ms: int
    usage_known: bool
    candidates: list[CandidateDetail] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        return self.chosen.verdict

    @property
    def artifact_ref(self) -> str:
        return self.chosen.made.location.ref

    @property
    def passed_checks(self) -> bool:
        return all_passed(self.chosen.checks)

    @property
    def rank(self) -> tuple[bool, bool, float, int]:
        """Best first: as an outcome ranks, then the later of two equals."""
        return (*self.chosen.rank, self.number)

    def revision(self) -> Revision:
        """What the executor is asked to revise next."""
        verdict = self.verdict
        return Revision(self.chosen.made.shown, self.number, verdict.feedback_for_executor, verdict.strengths,
                        verdict.weaknesses)

    def detail(self) -> IterationDetail:
        """The iteration as the JobResult's `iterations_detail` shows it."""
        return IterationDetail(iteration=self.number, duration_ms=self.duration_ms, converged=self.verdict.converged,
                               confidence=self.verdict.confidence, cost_usd=float(self.cost),
                               artifact_ref=self.artifact_ref, usage_known=self.usage_known,
                               checks=self.chosen.checks, candidates=self.candidates)


@dataclass
class Plateau:
    """`limits.patience`: a stall is `patience` iterations in a row without the best confidence rising `min_gain`
    above where it last rose."""

    patience: int | None
    min_gain: float
    mark: float | None = None
    stale: int = 0

    def after(self, confidence: float) -> str | None:
        """Count one iteration; when the job has stalled, say how."""
        if self.patience is None:
            return None
        if self.mark is None or confidence >= self.mark + self.min_gain:
            self.mark, self.stale = confidence, 0
            return None
        self.stale += 1
        if self.stale < self.patience:
            return None
        return (f"the best confidence ({self.mark:g}) has not risen by {self.min_gain:g} for {self.stale} "
                f"iteration(s) in a row")


@dataclass
class JobRun:
    plan: JobPlan
    settings: FactorySettings
    log: EventLog
    created_at: object = field(default_factory=utcnow)
    iterations: list[Iteration] = field(default_factory=list)

    def __post_init__(self) -> None:
        job = self.plan.job
        self.budget = Budget(job.limits.budget_usd)
        self.deadline = time.time() + job.limits.timeout_minutes * 60
        self.report = JobReport(job.job_id, job.function, job.limits)
        self.calls = PaidCalls(job.job_id, self.budget, self.log, self.report, self.deadline)

    async def run(self) -> JobResult:
        """Iterate until a stop reason, then write the result and close the log."""
        started_at = utcnow()
        await self.log.emit(Event.JOB_STARTED, job_id=self.plan.job.job_id, executor_model=self.plan.executor.name,
                            evaluator_model=self.plan.evaluator.name, budget_usd=self.plan.job.limits.budget_usd)
        error: str | None = None
        note: str | None = None
        try:
            stop, note = await self._loop()
        except BudgetExceeded as exc:
            stop, error = StopReason.BUDGET, str(exc)
        except DeadlineExceeded as exc:
            stop, error = StopReason.TIMEOUT, str(exc)
        except (ProviderError, StorageError) as exc:
            stop, error = StopReason.ERROR, str(exc)
        except asyncio.CancelledError:
            await asyncio.shield(self._finish(StopReason.CANCELLED, started_at, "cancelled through Prefect"))
            raise
        result = await self._finish(stop, started_at, error, note)
        if stop is StopReason.ERROR:
            cause = (error or "no detail").rstrip(".")
            raise JobFailed(f"job {result.job_id} failed: {cause}. Result: {self.plan.result_path.ref}; "
                            f"log: {self.plan.log_path.ref}")
        return result

    async def _loop(self) -> tuple[StopReason, str | None]:
        """Iterate until a stop reason; with it, what the event log should say of a plateau."""
        limits = self.plan.job.limits
        plateau = Plateau(limits.patience, self.settings.plateau_min_gain)
        while True:
            if len(self.iterations) >= limits.max_cycles:
                return StopReason.MAX_CYCLES, None
            if time.time() >= self.deadline:
                return StopReason.TIMEOUT, None
            done = await self._iterate(len(self.iterations) + 1)
            if done.passed_checks and done.verdict.converged and done.verdict.confidence >= limits.min_confidence:
                return StopReason.CONFORMITY, None
            if (stalled := plateau.after(done.verdict.confidence)) is not None:
                return StopReason.PLATEAU, stalled

    async def _iterate(self, n: int) -> Iteration:
        started = time.perf_counter()
        await self.log.emit(Event.ITERATION_START, iteration=n, spent_usd=float(self.budget.spent))
        # The executor revises the best-judged artifact so far, never a later regression.
        best = max(self.iterations, key=lambda i: i.rank, default=None)
        if self.plan.media_kind is not None:
            feedback = best.verdict.feedback_for_executor if best else None
            made = await make_media(self.calls, self.plan, self.settings, n, feedback)
            outcomes = [await self._assess(n, Slot(), made)]
        else:
            outcomes = await self._candidates(n, best.revision() if best else None)
        chosen = max(outcomes, key=lambda o: o.rank)
        done = self._record(n, chosen, started, outcomes)
        if chosen.error is not None:  # the artifact was paid for: it is in the result, marked as not judged
            raise chosen.error
        verdict = done.verdict
        self.report.iteration(n, chosen.made.shown, done.artifact_ref, chosen.made.extension, verdict, done.cost,
                              self.budget.spent, done.duration_ms, chosen.checks, done.candidates)
        calls = self.budget.records_of(n)
        await self.log.emit(Event.ITERATION_END, iteration=n, converged=verdict.converged,
                            confidence=verdict.confidence, cost_usd=float(done.cost),
                            spent_usd=float(self.budget.spent), duration_ms=done.duration_ms,
                            usage_known=done.usage_known, artifact_ref=done.artifact_ref,
                            calls=[r.model_dump(mode="json", include=CALL_FIELDS) for r in calls])
        if (listener := progress_listener.get()) is not None:
            listener({"iteration": n, "max_cycles": self.plan.job.limits.max_cycles, "converged": verdict.converged,
                      "confidence": verdict.confidence, "spent_usd": float(self.budget.spent)})
        return done

    async def _candidates(self, n: int, revision: Revision | None) -> list[Outcome]:
        """One artifact, or best-of-K: K distinct executor calls at once, each checked and judged. The worst case of
        all K, and of their evaluation, is held before any starts, so together they cannot cross the ceiling."""
        count = self.plan.job.candidates
        slots = [Slot(k, count) for k in range(1, count + 1)] if count > 1 else [Slot()]
        requests = [executor_request(self.plan, self.settings, revision, slot) for slot in slots]
        if count == 1:
            return [await self._assess(n, slots[0], await make_text(self.calls, self.plan, n, slots[0], requests[0]))]
        executor_worst = [self.plan.executor.price.worst_case(r.input_token_bound(), r.max_tokens) for r in requests]
        evaluator_worst = evaluator_bound(self.plan, self.settings, self._history())
        before = self.budget.held
        self.budget.hold(sum(executor_worst) + evaluator_worst * count, f"the {count} candidates of iteration {n}")
        try:
            async with asyncio.TaskGroup() as group:
                running = [group.create_task(self._candidate(n, slot, request, worst, evaluator_worst))
                           for slot, request, worst in zip(slots, requests, executor_worst, strict=True)]
            return [task.result() for task in running]
        except* (BudgetExceeded, DeadlineExceeded, ProviderError, StorageError) as group_error:
            raise group_error.exceptions[0] from None  # the job stops for the first cause, as with one candidate
        finally:
            self.budget.release(self.budget.held - before)  # what the calls that ended early did not give back

    async def _candidate(self, n: int, slot: Slot, request: ChatRequest, executor_hold: Decimal,
                         evaluator_hold: Decimal) -> Outcome:
        made = await make_text(self.calls, self.plan, n, slot, request, held=executor_hold)
        return await self._assess(n, slot, made, held=evaluator_hold)

    async def _assess(self, n: int, slot: Slot, made: Made, held: Decimal = Decimal(0)) -> Outcome:
        """Checks first; the evaluator only for an artifact that passed them. A call that could not be made leaves
        the artifact not judged, with the cause kept for the iteration to raise once it is recorded."""
        await self.log.emit(Event.EXECUTOR_RESPONSE, iteration=n, **slot.fields, **made.output.model_dump())
        job = self.plan.job
        checks = await check(self.log, job.checks, self.settings.allow_code_checks, n, slot, made.shown) \
            if job.checks else []
        if not all_passed(checks):  # known to fail: no money is spent judging it
            self.budget.release(held)
            return Outcome(slot, made, checks, checks_failed_verdict(checks))
        request = evaluator_request(self.plan, self.settings, made.shown, made.images, self._history())
        try:
            verdict = await judge(self.calls, self.log, self.plan, n, slot, request, held)
        except (BudgetExceeded, DeadlineExceeded, ProviderError) as exc:
            return Outcome(slot, made, checks, unjudged_verdict(str(exc)), exc)
        return Outcome(slot, made, checks, verdict)

    def _history(self) -> list[tuple[int, Verdict]]:
        """The evaluator's own earlier verdicts, on artifacts that passed their checks and were read."""
        return [(i.number, i.verdict) for i in self.iterations if i.passed_checks and not i.verdict.parse_error]

    def _record(self, n: int, chosen: Outcome, started: float, outcomes: list[Outcome]) -> Iteration:
        candidates = [] if len(outcomes) < 2 else [
            CandidateDetail(candidate=o.slot.k or 0, artifact_ref=o.made.location.ref,
                            checks_passed=all_passed(o.checks), converged=o.verdict.converged,
                            confidence=o.verdict.confidence,
                            cost_usd=float(self.budget.spent_on(n, o.slot.role("executor"))
                                           + self.budget.spent_on(n, o.slot.role("evaluator"))),
                            chosen=o is chosen)
            for o in outcomes]
        done = Iteration(n, chosen, self.budget.spent_on(n), int((time.perf_counter() - started) * 1000),
                         all(r.usage_known for r in self.budget.records_of(n)), candidates)
        self.iterations.append(done)
        return done

    async def _finish(self, stop: StopReason, started_at: datetime, error: str | None,
                      note: str | None = None) -> JobResult:
        result = self._result(stop, started_at, error)
        if stop in STOP_EVENTS:
            await self.log.emit(STOP_EVENTS[stop], stop_reason=stop.value, detail=error or note)
        if self.plan.final_path is not None and result.final_artifact_ref is not None:
            best = next(i for i in self.iterations if i.artifact_ref == result.final_artifact_ref)
            await store_artifact(self.plan.final_path, best.chosen.made.data)
        await self._write_result(result)
        await self.log.emit(Event.JOB_COMPLETED, status=result.status.value, stop_reason=stop.value,
                            total_cost_usd=result.total_cost_usd, total_iterations=result.total_iterations,
                            final_artifact_ref=result.final_artifact_ref, result_ref=self.plan.result_path.ref)
        self.report.budget(self.budget.spent, None, None)
        await self.report.summary(result)
        return result

    async def _write_result(self, result: JobResult) -> None:
        """The JobResult beside the log; where the log already went to the spool (S3 down), the result goes too."""
        data = result.model_dump_json(indent=2).encode()
        if self.log.spooled is not None:
            await get_storage().write_spooled(self.plan.result_path, data)
        else:
            await get_storage().write(self.plan.result_path, data)

    def _result(self, stop: StopReason, started_at: datetime, error: str | None) -> JobResult:
        functional = [i.number for i in self.iterations if not i.verdict.weaknesses and not i.verdict.parse_error]
        in_iterations = sum((i.cost for i in self.iterations), Decimal(0))
        best = max(self.iterations, key=lambda i: i.rank, default=None)
        final = self.iterations[-1] if stop is StopReason.CONFORMITY else best
        completed_at = utcnow()
        return JobResult(
            job_id=self.plan.job.job_id, status=stop.status, stop_reason=stop,
            converged=stop is StopReason.CONFORMITY,
            final_artifact_ref=final.artifact_ref if final else None,
            last_functional_iteration=functional[-1] if functional else None,
            total_iterations=len(self.iterations),
            total_cost_usd=float(self.budget.spent), other_cost_usd=float(self.budget.spent - in_iterations),
            total_duration_ms=int((completed_at - started_at).total_seconds() * 1000),
            created_at=self.created_at, started_at=started_at, completed_at=completed_at,
            executor_model_used=self.plan.executor.name, evaluator_model_used=self.plan.evaluator.name,
            iterations_detail=[i.detail() for i in self.iterations],
            log_ref=self.plan.log_path.ref, error=error,
            dry_run=DRY_RUN_MODEL in (self.plan.executor.name, self.plan.evaluator.name),
            usage=self._token_totals(), cache_savings_usd=float(self._cache_savings()),
        )

    def _token_totals(self) -> TokenTotals:
        usages = [r.usage for r in self.budget.records]
        return TokenTotals(input_tokens=sum(u.input_tokens for u in usages),
                           output_tokens=sum(u.output_tokens for u in usages),
                           cache_read_tokens=sum(u.cache_read_tokens for u in usages),
                           cache_write_tokens=sum(u.cache_write_5m_tokens + u.cache_write_1h_tokens for u in usages))

    def _cache_savings(self) -> Decimal:
        prices = {m.api_name: m.price for m in (self.plan.executor, self.plan.evaluator, self.plan.transcriber) if m}
        return sum((prices[r.model].cache_savings(r.usage) for r in self.budget.records if r.model in prices),
                   Decimal(0))
