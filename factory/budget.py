"""The budget as a hard ceiling: a call is made only if its worst case fits in what is left.

It is also the job's ledger: every billed call, and every attempt that failed after it was (or may
have been) billed, is charged once, so the job's total is the exact sum of what the providers billed.
"""

from __future__ import annotations

from decimal import Decimal

from factory.errors import BudgetExceeded
from factory.models import CallRecord


class Budget:
    """Money spent so far against a limit, exact to the token (Decimal).

    Example::

        budget = Budget(2.0)
        budget.check(Decimal("0.05"), "the executor call of iteration 1")  # raises BudgetExceeded if it can't fit
        budget.charge(record)                                                # once per record, however often asked
    """

    def __init__(self, limit_usd: float) -> None:
        self.limit = Decimal(str(limit_usd))
        self.spent = Decimal(0)
        self.records: list[CallRecord] = []
        self.held = Decimal(0)
        self._charged: set[str] = set()

    @property
    def left(self) -> Decimal:
        """What may still be spent: the limit less what was charged and what is held for calls running at once."""
        return self.limit - self.spent - self.held

    def check(self, worst_case: Decimal, what: str, own_hold: Decimal = Decimal(0)) -> None:
        """Raise BudgetExceeded unless a call costing up to `worst_case` fits; a call that runs on a hold may use
        its own hold (`own_hold`), never another's."""
        if worst_case > self.left + own_hold:
            raise BudgetExceeded(float(worst_case), float(self.left + own_hold), what)

    def hold(self, amount: Decimal, what: str) -> None:
        """Set `amount` aside for calls about to run at once, so that together they cannot cross the ceiling.

        Raises:
            BudgetExceeded: it does not fit; nothing is held.
        """
        self.check(amount, what)
        self.held += amount

    def release(self, amount: Decimal) -> None:
        """Give back a hold once its calls are done (what they spent is in `spent`)."""
        self.held -= amount

    def charge(self, record: CallRecord) -> None:
        """Add a billed call to the ledger; a record already charged (same id) is not charged again."""
        if record.id in self._charged:
            return
        self._charged.add(record.id)
        self.records.append(record)
        self.spent += record.cost_usd

    def records_of(self, iteration: int) -> list[CallRecord]:
        """The calls charged to iteration `iteration`, in the order they were charged."""
        return [r for r in self.records if r.iteration == iteration]

    def spent_on(self, iteration: int, role_prefix: str = "") -> Decimal:
        """What iteration `iteration` cost, or its calls whose role starts with `role_prefix` (e.g. "evaluator")."""
        return sum((r.cost_usd for r in self.records_of(iteration) if r.role.startswith(role_prefix)), Decimal(0))
