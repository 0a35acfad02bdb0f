"""Prompt caching, priced exactly: the stable part of every prompt first, a cache point where Anthropic takes one,
`prompt_cache_key` for OpenAI, and the bill the emulator keeps as the real APIs do."""

from __future__ import annotations

from decimal import Decimal

import pytest

from factory.models import JobResult, StopReason, Usage
from factory.pricing import Price
from factory.prompts import Prompt, user_message
from factory.providers.base import ImagePart
from tests.conftest import billed_cost
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, run_job

LONG_SEED = "Write the report the reference asks for. " + "Context sentence about rivers and their banks. " * 1000
REFERENCE = "A fact about the river basin, measured in 2026. " * 800  # ~10,000 tokens more, in input_refs
PNG = ImagePart(media_type="image/png", data="iVBORw0KGgo=")


@pytest.mark.fast
def test_the_stable_part_is_marked_only_when_the_model_can_cache_it():
    prompt = Prompt(stable="s" * 8000, changing="the artifact")
    marked = user_message(prompt, [], "system", 1024)
    assert [p.cache_point for p in marked.content] == [True, False]
    assert user_message(prompt, [], "system", 4096).content == prompt.text  # ~2,000 tokens: under the minimum
    assert user_message(prompt, [], "system", None).content == prompt.text  # OpenAI: its own caching only


@pytest.mark.fast
def test_images_being_judged_come_after_the_cache_point_reference_images_before_it():
    prompt = Prompt(stable="s" * 8000, changing="judge this")
    judged = user_message(prompt, [PNG], "", 1024, images_change=True).content
    reference = user_message(prompt, [PNG], "", 1024).content
    assert [type(p).__name__ for p in judged] == ["TextPart", "ImagePart", "TextPart"] and judged[0].cache_point
    assert [type(p).__name__ for p in reference] == ["ImagePart", "TextPart", "TextPart"] and reference[1].cache_point


@pytest.mark.fast
def test_cache_savings_are_what_plain_input_would_have_cost_less_the_bill():
    price = Price(input=Decimal(3), output=Decimal(15), cache_read=Decimal("0.3"), cache_write_5m=Decimal("3.75"))
    read = Usage(input_tokens=100, cache_read_tokens=1_000_000)
    assert price.cache_savings(read) == Decimal("2.7")
    written = Usage(input_tokens=100, cache_write_5m_tokens=1_000_000)
    assert price.cache_savings(written) == Decimal("-0.75")


def totals(llm) -> dict[str, int]:
    return {"input_tokens": sum(b.input_tokens for b in llm.billed),
            "output_tokens": sum(b.output_tokens for b in llm.billed),
            "cache_read_tokens": sum(b.cache_read_tokens for b in llm.billed),
            "cache_write_tokens": sum(b.cache_write_tokens for b in llm.billed)}


@pytest.mark.parametrize("model", ["claude-sonnet-5-5", "gpt-5.4"])
async def test_a_long_stable_prefix_is_read_from_the_cache_and_billed_to_the_token(factory_env, storage_root, model):
    llm = factory_env
    storage_root.mkdir(parents=True, exist_ok=True)
    (storage_root / "reference.txt").write_text(REFERENCE)
    llm.reset(Script(verdicts=[NOT_YET, NOT_YET, NOT_YET, NOT_YET, DONE]))
    result: JobResult = await (await run_job(seed=LONG_SEED, input_refs=["reference.txt"], executor_model=model,
                                             evaluator_model=model, limits={"max_cycles": 5})).result()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 5
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm)
    assert result.usage.model_dump() == totals(llm)
    executor_calls = [b for b in llm.billed if b.role == "executor"]
    assert all(b.cache_read_tokens > 20_000 for b in executor_calls[1:]), "the seed and reference are cached"
    assert result.cache_savings_usd > 0
    if model.startswith("claude"):
        assert executor_calls[0].cache_write_tokens > 20_000 and result.usage.cache_write_tokens > 0
        first = next(r["body"] for r in llm.requests if not r["body"].get("tools"))
        assert first["messages"][0]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    else:
        keys = {r["body"].get("prompt_cache_key") for r in llm.requests}
        assert keys == {f"{result.job_id}-executor", f"{result.job_id}-evaluator"}


async def test_a_short_prompt_gets_no_cache_point(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET, DONE]))
    result: JobResult = await (await run_job()).result()
    assert all(isinstance(r["body"]["messages"][0]["content"], str) for r in llm.requests)
    assert result.usage.cache_write_tokens == 0 and result.cache_savings_usd == 0
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm)
