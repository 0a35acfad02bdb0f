"""Reading an evaluator's reply into a `Verdict`, whatever shape it arrives in.

Structured output is asked for; still, replies come with prose around JSON, code fences,
missing fields or a confidence of 85. Anything that cannot be read as a verdict raises
`UnreadableVerdict` (the caller repairs once); `unparseable_verdict` is the non-converged
verdict used when the repair fails too. Nothing here ever defaults to convergence.
"""

from __future__ import annotations

import json
from typing import Any

from factory.checks import CheckResult
from factory.models import Verdict


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
    """The non-converged verdict for a reply still unreadable after the repair call."""
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


def checks_failed_verdict(results: list[CheckResult]) -> Verdict:
    """For an artifact that failed a deterministic check: not converged, not judged (no evaluator call is spent
    on it), and the failures, trimmed, as what the executor must fix first."""
    failed = [r for r in results if not r.passed]
    weaknesses = [f"{r.type} check failed: {r.detail}" for r in failed]
    return Verdict(converged=False, confidence=0.0, weaknesses=weaknesses,
                   feedback_for_executor="The artifact failed these checks; make them pass first:\n"
                   + "\n".join(f"- {w}" for w in weaknesses))


def _json_in(text: str) -> dict[str, Any]:
    """The one verdict object in a text reply.

    Every JSON object in the text that has a `converged` or `confidence` key is a candidate (a reply may quote
    the artifact, and an artifact may hold such an object). The verdict is read only when it is unambiguous:
    every candidate has both keys and they all say the same; otherwise the reply goes to the repair call.
    """
    if not text or not text.strip():
        raise UnreadableVerdict("the reply was empty")
    candidates = _verdict_objects(text)
    if not candidates:
        raise UnreadableVerdict("no JSON object with a verdict was found in the reply")
    for candidate in candidates:
        missing = [key for key in ("converged", "confidence") if key not in candidate]
        if missing:
            raise UnreadableVerdict(f"a verdict object in the reply lacks {' and '.join(f'`{k}`' for k in missing)}")
    said = {(_coerce(c).converged, _coerce(c).confidence) for c in candidates}
    if len(said) > 1:
        raise UnreadableVerdict(f"the reply holds {len(candidates)} verdict objects that disagree; reply with one")
    return candidates[-1]


def _verdict_objects(text: str) -> list[dict[str, Any]]:
    """The outermost JSON objects in `text` that look like verdicts, in order (objects nested in one are skipped)."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    position = 0
    while (start := text.find("{", position)) != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        if isinstance(value, dict) and ("converged" in value or "confidence" in value):
            found.append(value)
            position = end
        else:
            position = start + 1
    return found


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
