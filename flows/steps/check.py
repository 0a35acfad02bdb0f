"""The check step: the job's deterministic checks on one artifact, and their results in the event log."""

from __future__ import annotations

from factory.checks import Check, CheckResult, all_passed
from factory.eventlog import EventLog
from factory.models import Event
from flows.steps.common import Slot
from tasks.check import check_artifact


async def check(log: EventLog, checks: list[Check], allow_code: bool, n: int, slot: Slot,
                     artifact: str) -> list[CheckResult]:
    """Run `checks` on iteration `n`'s artifact for `slot`; say in the log whether all passed."""
    results = await check_artifact(n, checks, artifact, allow_code)
    await log.emit(Event.CHECKS_RESULT, iteration=n, **slot.fields, passed=all_passed(results),
                   checks=[r.model_dump() for r in results])
    return results
