"""Evaluator replies of every shape: read when they can be, never an accidental convergence."""

from __future__ import annotations

import json

import pytest

from factory.models import JobResult, StopReason
from factory.verdict import UnreadableVerdict, parse_verdict
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, read_log, run_job

GOOD = '{"converged": true, "confidence": 0.9, "strengths": ["a"], "weaknesses": [], "feedback_for_executor": ""}'


@pytest.mark.fast
@pytest.mark.parametrize("text, converged, confidence", [
    (GOOD, True, 0.9),
    (f"Here is my verdict:\n```json\n{GOOD}\n```\nThanks.", True, 0.9),
    (f"Sure! {GOOD} Hope that helps.", True, 0.9),
    ('{"converged": "false", "confidence": "0.4"}', False, 0.4),
    ('{"converged": false, "confidence": 85}', False, 0.85),
    ('{"converged": true, "confidence": "90%"}', True, 0.9),
])
def test_readable_replies(text, converged, confidence):
    verdict = parse_verdict(None, text)
    assert verdict.converged is converged and verdict.confidence == pytest.approx(confidence)


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("I think it is pretty good overall.", "no JSON object"),
    ('{"confidence": 0.9}', "`converged`"),
    ('{"converged": "yes", "confidence": 0.9}', "`converged`"),
    ('{"converged": true}', "`confidence`"),
    ('{"converged": true, "confidence": 250}', "from 0 to 1"),
    ('{"converged": true, "confidence": -0.2}', "from 0 to 1"),
    ('{"converged": true, "confidence": "high"}', "not a number"),
    ('{"converged": true, "confidence": 0.9, "weaknesses": 3}', "`weaknesses`"),
])
def test_unreadable_replies_raise(text, message):
    with pytest.raises(UnreadableVerdict, match=message):
        parse_verdict(None, text)


@pytest.mark.fast
def test_tool_input_wins_over_text():
    verdict = parse_verdict({"converged": False, "confidence": 0.3}, GOOD)
    assert verdict.converged is False


async def test_malformed_reply_is_repaired_once(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=['{"confidence": 0.9}', DONE]))
    result: JobResult = await (await run_job()).result()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 1
    evaluator_calls = [r["body"] for r in llm.requests if r["body"].get("tools")]
    assert len(evaluator_calls) == 2
    repair = evaluator_calls[1]["messages"]
    assert [m["role"] for m in repair] == ["user", "assistant", "user"]
    assert "could not be read" in repair[-1]["content"] and "`converged`" in repair[-1]["content"]


async def test_unreadable_after_repair_is_a_non_converged_verdict(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=["", "totally converged, 100% confident!", DONE]))
    result: JobResult = await (await run_job(limits={"max_cycles": 3})).result()
    first = result.iterations_detail[0]
    assert first.converged is False and first.confidence == 0.0
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 2
    responses = [e["data"] for e in read_log(result.log_ref) if e["event"] == "EVALUATOR_RESPONSE"]
    assert "evaluation unparseable" in responses[0]["parse_error"]
    assert responses[1]["parse_error"] is None


async def test_prose_and_fences_never_converge_by_accident(factory_env):
    llm = factory_env
    fenced = f"```json\n{NOT_YET}\n```".replace("'", '"').replace("False", "false")
    llm.reset(Script(verdicts=[fenced, "The artifact is great. converged: true", "nope"]))
    result: JobResult = await (await run_job(limits={"max_cycles": 2})).result()
    assert result.stop_reason is StopReason.MAX_CYCLES
    assert not any(d.converged for d in result.iterations_detail)


QUOTED = ('The artifact ends with the line {"converged": true, "confidence": 1.0}, which is not a verdict.\n'
          'My verdict: {"converged": false, "confidence": 0.3, "strengths": [], "weaknesses": ["quotes JSON"], '
          '"feedback_for_executor": "Drop the JSON line."}')


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    (QUOTED, "disagree"),
    ('{"converged": true, "confidence": 0.95} but on reflection {"converged": true, "confidence": 0.4}', "disagree"),
    ('Quoted: {"confidence": 1.0}. Verdict: {"converged": false, "confidence": 0.2}', "lacks `converged`"),
    ('```json\n{"converged": true, "confidence": 1.0}\n```\n```json\n{"converged": false, "confidence": 1.0}\n```',
     "disagree"),
])
def test_ambiguous_text_verdicts_are_unreadable(text, message):
    with pytest.raises(UnreadableVerdict, match=message):
        parse_verdict(None, text)


@pytest.mark.fast
def test_the_same_verdict_repeated_is_read():
    verdict = parse_verdict(None, f"```json\n{GOOD}\n```\nOnce more, plainly: {GOOD}")
    assert verdict.converged is True and verdict.confidence == 0.9


@pytest.mark.fast
def test_a_verdict_that_holds_a_quoted_object_in_its_feedback_is_read():
    text = ('{"converged": false, "confidence": 0.5, "weaknesses": ["w"], '
            '"feedback_for_executor": "Remove {\\"converged\\": true} from the text."}')
    verdict = parse_verdict(None, text)
    assert verdict.converged is False and "Remove" in verdict.feedback_for_executor


async def test_a_quoted_positive_verdict_never_converges_the_job(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[QUOTED, json.dumps(NOT_YET), json.dumps(DONE)]))
    result: JobResult = await (await run_job(limits={"max_cycles": 3})).result()
    first = result.iterations_detail[0]
    assert first.converged is False and first.confidence == NOT_YET["confidence"]
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 2
    evaluator_calls = [r["body"] for r in llm.requests if r["body"].get("tools")]
    assert len(evaluator_calls) == 3, "the ambiguous reply went through the one repair call"
    assert "disagree" in evaluator_calls[1]["messages"][-1]["content"]
