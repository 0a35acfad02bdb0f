"""Reading an evaluator's reply into a `Verdict`, whatever shape it arrives in.

Structured output is asked for; still, replies come with prose around JSON, code fences,
missing fields or a confidence of 85. Anything that cannot be read as a verdict raises
`UnreadableVerdict` (the caller repairs once); `unparseable_verdict` is the non-converged
verdict used when the repair fails too. Nothing here ever defaults to convergence.
"""

from __future__ import annotations

import json
import re
from typing import Any

from factory.models import Verdict

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


class UnreadableVerdict(ValueError):
    """The reply holds no usable verdict; the message says what was wrong."""


def parse_verdict(structured: dict[str, Any] | None, text: str) -> Verdict:
    """A Verdict from a tool call's input or, failing that, from JSON found in the text.

    Raises:
        UnreadableVerdict: no verdict could be read.
    """
    data = structured if structured is not None else _json_in(text)
    return _coerce(data)


def unparseable_verdict(error: str) -> Verdict:
    return Verdict(
        converged=False,
        confidence=0.0,
        weaknesses=["The evaluation could not be read, so this iteration was not judged."],
        feedback_for_executor="Revise the artifact against the objective.",
        parse_error=f"evaluation unparseable: {error}",
    )


def unjudged_verdict(reason: str) -> Verdict:
    """For an artifact that was generated but could not be evaluated (budget or deadline)."""
    return Verdict(converged=False, confidence=0.0, weaknesses=["Not evaluated."],
                   parse_error=f"not evaluated: {reason}")


def _json_in(text: str) -> dict[str, Any]:
    if not text or not text.strip():
        raise UnreadableVerdict("the reply was empty")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start in (i for i, ch in enumerate(candidate) if ch == "{"):
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and ("converged" in value or "confidence" in value):
                return value
    raise UnreadableVerdict("no JSON object with a verdict was found in the reply")


def _coerce(data: dict[str, Any]) -> Verdict:
    converged = data.get("converged")
    if isinstance(converged, str) and converged.strip().lower() in ("true", "false"):
        converged = converged.strip().lower() == "true"
    if not isinstance(converged, bool):
        raise UnreadableVerdict(f"`converged` must be true or false, got {converged!r}")
    confidence = _confidence(data.get("confidence"))
    return Verdict(
        converged=converged,
        confidence=confidence,
        strengths=_strings(data.get("strengths"), "strengths"),
        weaknesses=_strings(data.get("weaknesses"), "weaknesses"),
        feedback_for_executor=str(data.get("feedback_for_executor") or ""),
    )


def _confidence(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("%")) / (100 if value.strip().endswith("%") else 1)
        except ValueError:
            raise UnreadableVerdict(f"`confidence` is not a number: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnreadableVerdict(f"`confidence` must be a number from 0 to 1, got {value!r}")
    if 1 < value <= 100:
        value = value / 100  # a percentage
    if not 0 <= value <= 1:
        raise UnreadableVerdict(f"`confidence` must be from 0 to 1, got {value!r}")
    return float(value)


def _strings(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if not isinstance(value, list):
        raise UnreadableVerdict(f"`{field}` must be a list of strings, got {type(value).__name__}")
    return [str(item) for item in value if str(item).strip()]
