"""What the loop's steps share: the gateway every paid call goes through, which artifact of an iteration a step
makes, and what a making step returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from factory.budget import Budget
from factory.eventlog import EventLog
from factory.models import Event, IterationOutput
from factory.preflight import ModelPlan
from factory.providers import ImagePart
from factory.storage import Location
from flows.report import JobReport
from tasks.retry import Allowance


@dataclass(frozen=True)
class Slot:
    """Which artifact of an iteration a call makes: the only one, or candidate `k` of `count`."""

    k: int | None = None
    count: int = 1

    @property
    def suffix(self) -> str:
        return "" if self.k is None else f"-c{self.k}"

    def role(self, base: str) -> str:
        return base + self.suffix

    @property
    def fields(self) -> dict[str, int]:
        """What the event log says of the slot: nothing for the only artifact."""
        return {} if self.k is None else {"candidate": self.k}


@dataclass
class Made:
    """What a making step produced: what the evaluator reads, and what is stored."""

    shown: str
    data: bytes
    extension: str
    location: Location
    output: IterationOutput
    images: list[ImagePart] = field(default_factory=list)


@dataclass
class PaidCalls:
    """Every paid call of a job goes through `call`: its worst case is checked against the budget and announced
    in the event log before it is made (and in the UI's budget artifact, at an iteration's first call), and what
    it billed is charged once."""

    job_id: str
    budget: Budget
    log: EventLog
    report: JobReport
    deadline: float
    shown_for: int = 0  # the iteration whose budget the UI shows: once an iteration, at its first call

    async def call(self, task: Any, event: Event, n: int, role: str, model: ModelPlan, request: Any,
                   worst: Decimal | None = None, held: Decimal = Decimal(0), **extra: Any) -> Any:
        """Make a call through its task, which checks each attempt's worst case against the budget and charges
        every billed attempt; the records of a result read from the cache (a re-run) are charged here.

        `worst` defaults to a chat request's bound; media calls pass their own. `held` is this call's share of a
        hold (candidates running at once): it may spend into it, and gives it back when it ends.
        """
        try:
            if worst is None:
                worst = model.price.worst_case(request.input_token_bound(), request.max_tokens)
            what = f"the {role} call of iteration {n}"
            if n != self.shown_for:  # each artifact is an API call: one an iteration shows what one a call would
                self.shown_for = n
                self.report.budget(self.budget.spent, worst, what)
            self.budget.check(worst, what, held)  # before the event: a call that cannot fit is never announced
            await self.log.emit(event, iteration=n, role=role, model=model.name, worst_case_usd=float(worst))
            allowance = Allowance(budget=self.budget, price=model.price, worst=worst, deadline=self.deadline,
                                  held=held)
            result = await task(self.job_id, n, role, model.provider, request, allowance=allowance, **extra)
        finally:
            self.budget.release(held)
        for record in result.calls:
            self.budget.charge(record)
        return result

