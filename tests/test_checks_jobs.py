"""Checks, the plateau stop and the better loop, in whole jobs through a real Prefect server and the emulator."""

from __future__ import annotations

from decimal import Decimal

import pytest
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError

from factory.models import JobResult, JobStatus, StopReason
from tests.conftest import billed_cost, reset_settings
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, job_params, read_log, run_job
from tests.test_params import deployment  # noqa: F401 - the fixture

ADD_TESTS = "from solution import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
ATTEMPTS = ["```python\ndef add(a, b):\n    return a - b\n```", "```python\ndef add(a, b):\n    return a * b\n```",
            "```python\ndef add(a, b):\n    return a + b\n```"]


def prompt_text(body: dict) -> str:
    content = body["messages"][-1]["content"] if "system" in body else body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))


def calls(llm, role: str) -> list[dict]:
    """The emulator's requests of one role: the evaluator is offered the verdict tool or schema."""
    judged = [r["body"] for r in llm.requests if r["body"].get("tools") or r["body"].get("response_format")]
    return judged if role == "evaluator" else [r["body"] for r in llm.requests if r["body"] not in judged]


@pytest.fixture
def code_checks(factory_env, monkeypatch):
    monkeypatch.setenv("FACTORY_ALLOW_CODE_CHECKS", "true")
    reset_settings()
    yield factory_env
    reset_settings()


async def test_code_that_fails_its_tests_is_never_judged_and_converges_only_when_they_pass(code_checks):
    llm = code_checks
    llm.reset(Script(executor=ATTEMPTS, verdicts=[DONE]))  # the evaluator would approve every one of them
    result: JobResult = await (await run_job(
        seed="Write add(a, b).", objective="A correct add.", function="CODE_GENERATION",
        checks=[{"type": "python", "tests": ADD_TESTS, "timeout_s": 60}])).result()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 3
    assert [d.checks[0].passed for d in result.iterations_detail] == [False, False, True]
    assert "assert -1 == 5" in result.iterations_detail[0].checks[0].detail
    assert len(calls(llm, "evaluator")) == 1, "no evaluator call on an artifact known to fail"
    second = prompt_text(calls(llm, "executor")[1])
    assert "python check failed" in second and "assert -1 == 5" in second
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm)
    events = [e for e in read_log(result.log_ref) if e["event"] == "CHECKS_RESULT"]
    assert [e["data"]["passed"] for e in events] == [False, False, True]
    assert "python: the job's pytest tests pass" in prompt_text(calls(llm, "evaluator")[0])


async def test_a_python_check_is_refused_unless_the_worker_allows_code(factory_env):
    state = await run_job(function="CODE_GENERATION", checks=[{"type": "python", "tests": ADD_TESTS}])
    assert state.is_failed()
    assert "`checks`" in state.message and "FACTORY_ALLOW_CODE_CHECKS=true" in state.message
    assert factory_env.requests == [], "nothing may be spent on a refused job"


@pytest.mark.parametrize("overrides, message", [
    ({"checks": [{"type": "python", "tests": ADD_TESTS}]}, "use it with function CODE_GENERATION"),
    ({"function": "IMAGE_GENERATION", "executor_model": "fal:fal-ai/flux/schnell",
      "checks": [{"type": "length", "unit": "chars", "max": 10}]}, "a IMAGE_GENERATION job makes media"),
], ids=["python-on-text", "media"])
async def test_checks_a_job_cannot_run_are_refused_before_any_call(code_checks, overrides, message):
    state = await run_job(**overrides)
    assert state.is_failed() and "`checks`" in state.message and message in state.message
    assert code_checks.requests == []


async def test_a_length_check_sends_the_count_back_and_saves_the_evaluator_call(factory_env):
    llm = factory_env
    llm.reset(Script(executor=["Too short.", "word " * 70], verdicts=[DONE]))
    result: JobResult = await (await run_job(checks=[{"type": "length", "unit": "words", "min": 60, "max": 100},
                                                     {"type": "regex", "pattern": r"\bword\b"}])).result()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 2
    first = result.iterations_detail[0]
    assert [c.passed for c in first.checks] == [False, False] and first.confidence == 0.0
    assert "2 words; expected 60..100" in first.checks[0].detail
    assert len(calls(llm, "evaluator")) == 1
    judged = prompt_text(calls(llm, "evaluator")[0])
    assert "length: 60..100 words" in judged and "confidence >= 0.8" in judged
    assert "2 words; expected 60..100" in prompt_text(calls(llm, "executor")[1])


SHAPELESS = [  # what the flow's parameter schema says: Prefect refuses these when the run is created
    [{"type": "python", "tests": "x", "timeout_s": 301}],
    [{"type": "python", "tests": "x", "timeout_s": 0}],
    [{"type": "length", "unit": "chars", "max": 5}] * 21,
    [{"type": "length", "unit": "pages", "max": 5}],
    [{"type": "shell", "command": "ls"}],
    [{"type": "regex", "pattern": "x", "flags": "i"}],
    "not a list",
]
MEANINGLESS = [  # what no JSON Schema can say: refused when the run starts, before any call
    ([{"type": "regex", "pattern": "(unclosed"}], "does not compile"),
    ([{"type": "length", "unit": "words", "min": 9, "max": 3}], "min"),
    ([{"type": "length", "unit": "words"}], "min"),
    ([{"type": "json_schema", "schema": {"type": "nope"}}], "Draft 2020-12"),
    ([{"type": "json_schema", "schema": {"$id": "http://127.0.0.1:9/s", "items": {"$dynamicRef": "http://127.0.0.1:9/x"}}}],
     "127.0.0.1:9/x"),
]


@pytest.mark.parametrize("checks", SHAPELESS, ids=range(len(SHAPELESS)))
async def test_checks_of_the_wrong_shape_are_refused_at_run_creation(deployment, checks):  # noqa: F811
    with pytest.raises(PrefectHTTPStatusError) as caught:
        await run_deployment(deployment, parameters=job_params(checks=checks), timeout=0)
    assert caught.value.response.status_code == 409
    assert "'checks" in caught.value.response.json()["detail"]


@pytest.mark.parametrize("checks, message", MEANINGLESS, ids=range(len(MEANINGLESS)))
async def test_checks_that_cannot_mean_anything_are_refused_before_any_call(factory_env, checks, message):
    state = await run_job(checks=checks)
    assert state.is_failed()
    assert "checks" in state.message and message in state.message, state.message
    assert factory_env.requests == []


async def test_a_job_whose_confidence_stalls_stops_with_plateau(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[{**NOT_YET, "confidence": 0.5}, {**NOT_YET, "confidence": 0.51},
                               {**NOT_YET, "confidence": 0.45}]))
    result: JobResult = await (await run_job(limits={"max_cycles": 10, "patience": 2})).result()
    assert result.status is JobStatus.EXHAUSTED and result.stop_reason is StopReason.PLATEAU
    assert result.total_iterations == 3  # 0.51 is not a rise of 0.02 over 0.5; 0.45 is the second stall
    log = read_log(result.log_ref)
    assert [e["event"] for e in log][-2:] == ["JOB_PLATEAU", "JOB_COMPLETED"]
    assert "has not risen by 0.02 for 2 iteration(s)" in log[-2]["data"]["detail"]
    assert result.final_artifact_ref == result.iterations_detail[1].artifact_ref


async def test_patience_is_refused_out_of_bounds(deployment):  # noqa: F811
    with pytest.raises(PrefectHTTPStatusError) as caught:
        await run_deployment(deployment, parameters=job_params(limits={"patience": 11}), timeout=0)
    assert "limits.patience" in caught.value.response.json()["detail"]


async def test_the_executor_revises_the_best_judged_artifact_not_a_later_regression(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[{**NOT_YET, "confidence": 0.7, "feedback_for_executor": "Keep the rhyme."},
                               {**NOT_YET, "confidence": 0.2, "feedback_for_executor": "Worse."}, DONE]))
    await run_job(limits={"max_cycles": 3})
    third = prompt_text(calls(llm, "executor")[2])
    assert "Draft 1: an artifact." in third and "Keep the rhyme." in third
    assert "Draft 2: an artifact." not in third and "Worse." not in third
    assert "<<<OBJECTIVE" in third
    evaluator_third = prompt_text(calls(llm, "evaluator")[2])
    assert "iteration 1: converged=False, confidence=0.7" in evaluator_third and "iteration 2:" in evaluator_third


async def test_a_block_reference_smuggled_into_a_check_never_reveals_the_block(factory_env, storage_root):
    """Prefect loads any `{"$ref": ...}` object in a run's parameters as a block before the flow starts: a
    schema that names the worker's Secret block must be refused without its value showing anywhere."""
    from prefect.blocks.system import Secret

    await Secret(value="s3cr3t-value-from-the-block").save("leaky", overwrite=True)
    job_id = "smuggled-block-ref"
    state = await run_job(job_id=job_id, checks=[{"type": "json_schema", "schema": {
        "const": {"$ref": {"block_document_slug": "secret/leaky"}}}}])
    assert state.is_failed() and factory_env.requests == []
    assert "s3cr3t-value-from-the-block" not in state.message
    written = [p.read_text(errors="replace") for p in (storage_root / job_id).rglob("*") if p.is_file()]
    assert not any("s3cr3t-value-from-the-block" in text for text in written)
