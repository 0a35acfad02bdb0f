"""The budget as a hard ceiling: a call is made only if its worst case fits in what is left."""

from __future__ import annotations

from decimal import Decimal

from factory.errors import BudgetExceeded


class Budget:
    """Money spent so far against a limit, exact to the token (Decimal)."""

    def __init__(self, limit_usd: float) -> None:
        self.limit = Decimal(str(limit_usd))
        self.spent = Decimal(0)

    @property
    def left(self) -> Decimal:
        return self.limit - self.spent

    def check(self, worst_case: Decimal, what: str) -> None:
        """Raise BudgetExceeded unless a call costing up to `worst_case` fits."""
        if worst_case > self.left:
            raise BudgetExceeded(float(worst_case), float(self.left), what)

    def charge(self, cost: Decimal) -> None:
        self.spent += cost
