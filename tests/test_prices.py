"""Every model the installed SDKs name is priced, retired, or unpriced with a reason; and the cost math.

No server: the price table, the SDKs' model lists and the OpenAI provider's usage mapping only.
"""

from __future__ import annotations

import json
import re
import typing
from datetime import date
from decimal import Decimal
from importlib.resources import files

import pytest
from anthropic.types import Model
from openai.types import ChatModel, CompletionUsage
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails

from factory.errors import ConfigurationError
from factory.models import Usage
from factory.preflight import retirement_date
from factory.pricing import Price, price_for, published, retirement
from factory.providers.openai import _usage as openai_usage
from factory.settings import FactorySettings

pytestmark = pytest.mark.fast

# The day the tables were last checked against the providers' pages: retirement checks are judged on it,
# so that the suite does not change its verdict as the calendar moves.
CHECKED_ON = date(2026, 12, 1)
SETTINGS = FactorySettings()


def literal_names(annotation) -> list[str]:
    """The string literals of a typing Literal/Union, however nested (`str` itself is skipped)."""
    names: list[str] = []
    for arg in typing.get_args(annotation):
        names.extend([arg] if isinstance(arg, str) else literal_names(arg))
    return names


SDK_MODELS = sorted(set(literal_names(ChatModel)) | set(literal_names(Model)))


def test_the_sdk_lists_were_read():
    assert {"gpt-4o-mini", "gpt-5.4", "o3", "claude-sonnet-5-5", "claude-haiku-4-5"} <= set(SDK_MODELS)


@pytest.mark.parametrize("name", SDK_MODELS)
def test_every_sdk_model_is_priced_retired_or_unpriced_with_a_reason(name):
    catalogue = published()
    priced, retired, reason = name in catalogue.prices, retirement(name), catalogue.unpriced.get(name)
    sdk_retires = retirement_date(name)
    assert priced or retired or sdk_retires or reason, f"{name} is neither priced, retired nor listed as unpriced"
    assert not (priced and reason), f"{name} is both priced and listed as unpriced"
    if reason is not None:
        assert len(reason) > 10, f"{name}: the reason it is not priced is missing"
    if retired is not None and retired.date <= CHECKED_ON:
        assert not priced, f"{name} was retired on {retired.date} but still has a price nothing can use"
    if retired is not None and retired.date > CHECKED_ON:
        assert priced, f"{name} is served until {retired.date} and needs its price until then"
    if retired is not None and sdk_retires is not None:
        assert retired.date == sdk_retires, f"{name}: prices.json and the Anthropic SDK disagree on the date"


def test_every_sdk_model_is_refused_or_priced_by_price_for():
    for name in SDK_MODELS:
        try:
            price = price_for(name, SETTINGS, today=CHECKED_ON)
        except ConfigurationError as exc:
            assert re.search(r"retired by its provider on \d{4}-\d{2}-\d{2}|is not priced because", str(exc)), name
        else:
            assert price.input > 0 and price.output > 0, name


def test_each_table_and_retirement_list_is_dated_and_sourced():
    raw = json.loads(files("factory").joinpath("prices.json").read_text())
    for group in [*raw["tables"], *raw["retired"]]:
        assert date.fromisoformat(group["published"]) <= CHECKED_ON, group
        assert group["source"].strip(), group
    names = [n for table in raw["tables"] for n in table["models"]]
    assert len(names) == len(set(names)), "a model is priced by two tables; the later would silently win"


def test_chat_model_prices_carry_cache_rates():
    """A chat model whose provider prices cache reads has them in the table, else a hit bills at full input."""
    catalogue = published()
    for name in SDK_MODELS:
        price = catalogue.prices.get(name)
        if price is None or name.endswith("-pro") or "-pro-" in name or name == "gpt-3.5-turbo-1106":
            continue  # the pro models and gpt-3.5-turbo-1106 have no cached-input rate
        assert price.cache_read is not None, name
        if name.startswith("claude-"):
            assert price.cache_write_5m is not None and price.cache_write_1h is not None, name


def test_anthropic_cache_writes_follow_the_published_multipliers():
    """5-minute writes are 1.25x input and 1-hour writes 2x, on every Claude model (cache reads vary)."""
    for name, price in published().prices.items():
        if name.startswith("claude-"):
            assert price.cache_write_5m == price.input * Decimal("1.25"), name
            assert price.cache_write_1h == price.input * 2, name


def test_default_models_are_priced():
    price_for(SETTINGS.default_executor_model, SETTINGS, today=CHECKED_ON)
    price_for(SETTINGS.default_evaluator_model, SETTINGS, today=CHECKED_ON)
    assert price_for("claude-sonnet-5-5", SETTINGS, today=CHECKED_ON).input == Decimal("2.0")


def test_gpt_4o_mini_and_its_snapshot_are_priced_alike():
    family = price_for("gpt-4o-mini", SETTINGS, today=CHECKED_ON)
    assert (family.input, family.cache_read, family.output) == (Decimal("0.15"), Decimal("0.075"), Decimal("0.6"))
    assert price_for("gpt-4o-mini-2024-07-18", SETTINGS, today=CHECKED_ON) == family


@pytest.mark.parametrize(("snapshot", "family"), [
    ("gpt-4o-2024-08-06", "gpt-4o"), ("gpt-4o-2024-11-20", "gpt-4o"), ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
    ("gpt-5-2025-08-07", "gpt-5"), ("o3-2025-04-16", "o3"), ("gpt-5.5-2026-04-23", "gpt-5.5"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"), ("claude-opus-4-5-20251101", "claude-opus-4-5"),
])
def test_dated_snapshots_are_priced_like_their_family(snapshot, family):
    catalogue = published()
    assert catalogue.prices[snapshot].model_dump(exclude={"published"}) == \
        catalogue.prices[family].model_dump(exclude={"published"})


def test_the_dearer_gpt_4o_snapshot_is_not_priced_like_its_family():
    """gpt-4o-2024-05-13 was billed $5/$15, not gpt-4o's $2.50/$10; it is retired now, so it is refused."""
    with pytest.raises(ConfigurationError, match=r"retired by its provider on 2026-10-23; use 'gpt-5.6-sol'"):
        price_for("gpt-4o-2024-05-13", SETTINGS, today=CHECKED_ON)


def test_a_retired_model_is_refused_naming_the_field_the_date_and_the_replacement():
    with pytest.raises(ConfigurationError) as caught:
        price_for("gpt-4-turbo", SETTINGS, "executor_model", today=CHECKED_ON)
    assert caught.value.field == "executor_model"
    assert "retired by its provider on 2026-10-23; use 'gpt-5.6-sol'" in str(caught.value)
    assert "FACTORY_PRICES=" in str(caught.value)


def test_a_scheduled_retirement_keeps_the_price_until_its_date():
    assert price_for("gpt-4o-mini", SETTINGS, today=date(2027, 1, 13)).input == Decimal("0.15")
    with pytest.raises(ConfigurationError, match=r"retired by its provider on 2027-01-14; use 'gpt-6-luna'"):
        price_for("gpt-4o-mini", SETTINGS, today=date(2027, 1, 14))
    assert retirement("openai:gpt-4o-mini").date == date(2027, 1, 14)


def test_an_unpriced_model_is_refused_with_its_reason():
    with pytest.raises(ConfigurationError) as caught:
        price_for("gpt-4o-search-preview", SETTINGS, "evaluator_model", today=CHECKED_ON)
    assert caught.value.field == "evaluator_model"
    assert "is not priced because it is a search model" in str(caught.value)
    assert "Set FACTORY_PRICES to price it" in str(caught.value)
    with pytest.raises(ConfigurationError, match="is not priced because no published price was found"):
        price_for("gpt-6.2-astra", SETTINGS, today=CHECKED_ON)


def test_an_unknown_model_still_gets_the_generic_message():
    with pytest.raises(ConfigurationError, match="no price is known for model 'openai:llama-3.3-70b'"):
        price_for("openai:llama-3.3-70b", SETTINGS, today=CHECKED_ON)


def test_a_configured_price_wins_over_retired_and_unpriced():
    settings = FactorySettings(prices=json.dumps({
        "_comment": "a proxy that still serves these",
        "gpt-4-turbo": {"input": 9, "output": 27},
        "openai:gpt-4o-search-preview": {"input": 1, "output": 2},
    }))
    assert price_for("gpt-4-turbo", settings, today=CHECKED_ON).input == Decimal(9)
    assert price_for("openai:gpt-4o-search-preview", settings, today=CHECKED_ON).output == Decimal(2)
    with pytest.raises(ConfigurationError, match="retired by its provider"):
        price_for("gpt-4", settings, today=CHECKED_ON)


def test_a_configured_price_file_in_the_published_shape_is_read(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"tables": [{"published": "2026-12-01", "source": "our contract",
                                            "models": {"gpt-6-luna": {"input": 0.05, "output": 0.25}}}]}))
    price = price_for("gpt-6-luna", FactorySettings(prices_file=path), today=CHECKED_ON)
    assert (price.input, price.published) == (Decimal("0.05"), "2026-12-01")


# --- cost math ----------------------------------------------------------------------------------------------


def openai_reply_usage(prompt: int, cached: int, completion: int, reasoning: int) -> Usage:
    """What the OpenAI provider bills for a Chat Completions reply with this usage block."""
    return openai_usage(CompletionUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning)))


def test_openai_cached_tokens_are_charged_at_the_cache_read_price():
    usage = openai_reply_usage(prompt=10_000, cached=8_000, completion=500, reasoning=0)
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (2_000, 8_000, 500)
    price = price_for("gpt-4o-mini", SETTINGS, today=CHECKED_ON)
    assert price.cost(usage) == (2_000 * Decimal("0.15") + 8_000 * Decimal("0.075") + 500 * Decimal("0.6")) / 10**6


def test_openai_cache_writes_are_charged_at_the_cache_write_price():
    usage = openai_usage(CompletionUsage(
        prompt_tokens=10_000, completion_tokens=100, total_tokens=10_100,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=2_000, cache_write_tokens=6_000)))
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_5m_tokens) == (2_000, 2_000, 6_000)
    price = price_for("gpt-5.6-terra", SETTINGS, today=CHECKED_ON)
    assert price.cost(usage) == (2_000 * price.input + 2_000 * price.cache_read + 6_000 * price.cache_write_5m
                                 + 100 * price.output) / 10**6
    assert price.cache_write_5m == price.input * Decimal("1.25")


@pytest.mark.parametrize("model", ["o3", "gpt-5", "gpt-5-mini", "gpt-5.4", "gpt-6.1-sol"])
def test_reasoning_tokens_are_billed_as_output(model):
    """`completion_tokens` counts visible and reasoning tokens; all of them are charged at the output price."""
    usage = openai_reply_usage(prompt=1_000, cached=0, completion=4_200, reasoning=4_000)
    assert usage.output_tokens == 4_200
    price = price_for(model, SETTINGS, today=CHECKED_ON)
    assert price.cost(usage) == (1_000 * price.input + 4_200 * price.output) / 10**6


@pytest.mark.parametrize("model", ["o3", "gpt-5-nano", "gpt-6-astra", "claude-opus-5-5"])
def test_the_worst_case_covers_reasoning_within_max_tokens(model):
    """`max_completion_tokens` (OpenAI) and `max_tokens` (Anthropic) bound visible plus reasoning output."""
    price = price_for(model, SETTINGS, today=CHECKED_ON)
    max_tokens, prompt_bound = 8_192, 3_000
    worst = price.worst_case(prompt_bound, max_tokens)
    for reply in (openai_reply_usage(prompt=prompt_bound, cached=0, completion=max_tokens, reasoning=max_tokens - 1),
                  Usage(input_tokens=prompt_bound - 1_000, cache_write_5m_tokens=1_000, output_tokens=max_tokens)):
        assert price.cost(reply) <= worst


def test_anthropic_cache_reads_and_writes_are_charged_at_their_rates():
    usage = Usage(input_tokens=100, output_tokens=50, cache_read_tokens=1_000, cache_write_5m_tokens=200,
                  cache_write_1h_tokens=300)
    price = price_for("claude-opus-5-5", SETTINGS, today=CHECKED_ON)
    expected = (100 * Decimal(4) + 50 * Decimal(20) + 1_000 * Decimal("0.2") + 200 * Decimal(5)
                + 300 * Decimal(8)) / 10**6
    assert price.cost(usage) == expected


def test_a_long_prompt_bills_the_whole_call_at_the_long_context_rates():
    """Claude Haiku 5.5: up to 100,000 prompt tokens (input plus cache reads and writes) at the low band."""
    price = price_for("claude-haiku-5-5", SETTINGS, today=CHECKED_ON)
    at_threshold = Usage(input_tokens=60_000, cache_read_tokens=40_000, output_tokens=1_000)
    assert price.cost(at_threshold) == (60_000 * Decimal("0.1") + 40_000 * Decimal("0.01")
                                        + 1_000 * Decimal("0.5")) / 10**6
    over = Usage(input_tokens=60_001, cache_read_tokens=40_000, output_tokens=1_000)
    assert price.cost(over) == (60_001 * Decimal("0.5") + 40_000 * Decimal("0.05") + 1_000 * Decimal("2.5")) / 10**6
    assert price.worst_case(100_000, 1_000) == (100_000 * Decimal("0.2") + 1_000 * Decimal("0.5")) / 10**6
    assert price.worst_case(150_000, 1_000) == (150_000 * Decimal("1.0") + 1_000 * Decimal("2.5")) / 10**6
    assert price.worst_case(150_000, 1_000) >= price.cost(Usage(input_tokens=150_000, output_tokens=1_000))


def test_openai_long_context_tier_starts_above_272k_prompt_tokens():
    price = price_for("gpt-6-luna", SETTINGS, today=CHECKED_ON)
    assert price.cost(Usage(input_tokens=272_000)) == 272_000 * Decimal("0.1") / 10**6
    assert price.cost(Usage(input_tokens=272_001, output_tokens=10)) == \
        (272_001 * Decimal("0.2") + 10 * Decimal("0.75")) / 10**6


def test_a_long_context_tier_needs_its_threshold():
    with pytest.raises(ValueError, match="together"):
        Price(input=1, output=2, long_context=Price(input=2, output=3))
    with pytest.raises(ValueError, match="one tier"):
        Price(input=1, output=2, long_context_above=10,
              long_context=Price(input=2, output=3, long_context_above=20, long_context=Price(input=3)))
