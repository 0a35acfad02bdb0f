"""The `dry-run` model: no network, no key, no cost; every artifact says no model ran.

It exercises the whole pipeline: the executor writes numbered drafts that revise the previous
one, and the evaluator accepts the second draft, so a quickstart shows two iterations.
"""

from __future__ import annotations

import re

from factory.models import Usage
from factory.providers.base import ChatReply, ChatRequest, Provider

DRY_RUN_MODEL = "dry-run"
ACCEPTED_DRAFT = 2
_DRAFT = re.compile(r"\[dry-run\] draft (\d+)")


class DryRunProvider(Provider):
    """The `dry-run` model, for both roles: numbered placeholder drafts, and verdicts that accept the second."""

    name = DRY_RUN_MODEL

    async def complete(self, request: ChatRequest, *, timeout_s: float) -> ChatReply:
        """The next draft or, asked for a verdict, one that converges from draft `ACCEPTED_DRAFT` on; free."""
        prompt = "\n".join(m.text() for m in request.messages)
        seen = [int(n) for n in _DRAFT.findall(prompt)]
        if request.response_schema is not None:
            draft = max(seen, default=0)
            accepted = draft >= ACCEPTED_DRAFT
            verdict = {
                "converged": accepted,
                "confidence": 1.0 if accepted else 0.5,
                "strengths": ["the pipeline ran end to end"],
                "weaknesses": [] if accepted else ["a dry-run draft is a placeholder, not real work"],
                "feedback_for_executor": "" if accepted else "Revise the draft.",
            }
            return ChatReply(text="", structured=verdict, usage=Usage(), model=DRY_RUN_MODEL, stop_reason="end_turn")
        draft = max(seen, default=0) + 1
        text = (f"[dry-run] draft {draft}\n\nNo model ran: this placeholder stands in for the artifact "
                f"asked for by the seed ({len(prompt)} characters of prompt).\n")
        return ChatReply(text=text, usage=Usage(), model=DRY_RUN_MODEL, stop_reason="end_turn")
