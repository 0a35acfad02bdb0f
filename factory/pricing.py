"""Prices per model as data, and the exact cost of a call.

`prices.json` beside this module holds the published tables (each with its date and source), the
models their provider has retired or retires soon (`retired`, with the date and the replacement the
provider names), and the models a user may name that no table prices (`unpriced`, with the reason).
`FACTORY_PRICES` (inline JSON) or `FACTORY_PRICES_FILE` adds or overrides entries, e.g. for a
self-hosted model behind an OpenAI-compatible server::

    FACTORY_PRICES='{"openai:llama-3.3-70b": {"input": 0.0, "output": 0.0}}'

A price configured there wins over everything in `prices.json`, a retirement included: a server that
still serves a retired model name can be used by pricing it.

Costs are computed in `Decimal` so that a job's total equals the sum of its calls exactly.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from functools import lru_cache
from importlib.resources import files
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory.errors import ConfigurationError
from factory.models import Usage
from factory.settings import FactorySettings

PER_TOKENS = Decimal(1_000_000)


class Price(BaseModel):
    """USD per million tokens, and per media unit. Cache prices default to the input price when a table
    omits them; a unit the table does not name costs nothing.

    Reasoning ("thinking") tokens are billed as output by both OpenAI and Anthropic, and both count them
    in the reply's output tokens, so `output` prices them too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(default=Decimal(0), ge=0)
    output: Decimal = Field(default=Decimal(0), ge=0)
    cache_read: Decimal | None = Field(default=None, ge=0)
    cache_write_5m: Decimal | None = Field(
        default=None, ge=0, description="Anthropic's 5-minute cache write; OpenAI's default (30-minute) one.")
    cache_write_1h: Decimal | None = Field(default=None, ge=0, description="Anthropic's 1-hour cache write.")
    per_image: Decimal = Field(default=Decimal(0), ge=0)
    per_megapixel: Decimal = Field(default=Decimal(0), ge=0)
    per_million_characters: Decimal = Field(default=Decimal(0), ge=0)
    per_second: Decimal = Field(default=Decimal(0), ge=0, description="Per second of media made or transcribed.")
    per_gpu_second: Decimal = Field(default=Decimal(0), ge=0)
    min_cache_tokens: int | None = Field(
        default=None, gt=0, description="The shortest prompt prefix the provider caches; unset: the Factory marks no "
        "cache point for this model (OpenAI caches on its own from 1,024 tokens).")
    long_context_above: int | None = Field(
        default=None, gt=0,
        description="Prompt tokens (input plus cache reads and writes) above which the whole call, output "
                    "included, is billed at `long_context` instead.")
    long_context: Price | None = None
    published: str | None = None

    @model_validator(mode="after")
    def _long_context_complete(self) -> Price:
        if (self.long_context is None) != (self.long_context_above is None):
            raise ValueError("set `long_context_above` and `long_context` together, or neither")
        if self.long_context is not None and self.long_context.long_context is not None:
            raise ValueError("`long_context` prices one tier; it cannot hold another `long_context`")
        return self

    def rates_for(self, prompt_tokens: int) -> Price:
        """The rates a call with a prompt of `prompt_tokens` tokens is billed at."""
        if self.long_context is not None and prompt_tokens > (self.long_context_above or 0):
            return self.long_context
        return self

    def cost(self, usage: Usage) -> Decimal:
        """The exact USD cost of `usage` at this price."""
        rates = self.rates_for(usage.input_tokens + usage.cache_read_tokens + usage.cache_write_5m_tokens
                               + usage.cache_write_1h_tokens)
        parts = (
            (usage.input_tokens, rates.input),
            (usage.output_tokens, rates.output),
            (usage.cache_read_tokens, rates.cache_read if rates.cache_read is not None else rates.input),
            (usage.cache_write_5m_tokens, rates.cache_write_5m if rates.cache_write_5m is not None else rates.input),
            (usage.cache_write_1h_tokens, rates.cache_write_1h if rates.cache_write_1h is not None else rates.input),
        )
        tokens = sum((Decimal(tokens) * price for tokens, price in parts), Decimal(0)) / PER_TOKENS
        return tokens + self._units(usage)

    def cache_savings(self, usage: Usage) -> Decimal:
        """What caching saved on this call: its cost had every cached or cache-written token been plain input,
        less what it cost (negative when writing the cache cost more than it has saved yet)."""
        uncached = usage.model_copy(update={
            "input_tokens": usage.input_tokens + usage.cache_read_tokens + usage.cache_write_5m_tokens
            + usage.cache_write_1h_tokens, "cache_read_tokens": 0, "cache_write_5m_tokens": 0,
            "cache_write_1h_tokens": 0})
        return self.cost(uncached) - self.cost(usage)

    def _units(self, usage: Usage) -> Decimal:
        return (usage.images * self.per_image + usage.megapixels * self.per_megapixel
                + usage.characters * self.per_million_characters / PER_TOKENS
                + usage.media_seconds * self.per_second + usage.gpu_seconds * self.per_gpu_second)

    def worst_case(self, input_tokens: int, max_output_tokens: int) -> Decimal:
        """The most a call with at most these tokens can cost (input billed at its dearest rate).

        `max_output_tokens` bounds reasoning tokens too: OpenAI's `max_completion_tokens` and Anthropic's
        `max_tokens` cap visible and reasoning output together.
        """
        if self.long_context is None or input_tokens <= (self.long_context_above or 0):
            return self._worst(self, input_tokens, max_output_tokens)
        # The prompt may land on either side of the threshold: the dearer of the two tiers bounds the call.
        short = self._worst(self, self.long_context_above or 0, max_output_tokens)
        return max(short, self._worst(self.long_context, input_tokens, max_output_tokens))

    @staticmethod
    def _worst(rates: Price, input_tokens: int, max_output_tokens: int) -> Decimal:
        dearest_input = max(p for p in (rates.input, rates.cache_write_5m, rates.cache_write_1h) if p is not None)
        return (Decimal(input_tokens) * dearest_input + Decimal(max_output_tokens) * rates.output) / PER_TOKENS


class Retirement(BaseModel):
    """The day a provider stops (or stopped) serving a model, and the model it recommends instead."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    date: dt.date
    replacement: str | None = None
    source: str | None = None


class Catalogue(NamedTuple):
    """Everything `prices.json` says: prices, retirements, and models deliberately left unpriced."""

    prices: dict[str, Price]
    retired: dict[str, Retirement]
    unpriced: dict[str, str]


def _table_from_json(raw: dict[str, Any], origin: str) -> dict[str, Price]:
    try:
        if "tables" in raw:
            return {
                name: Price(**{"min_cache_tokens": table.get("min_cache_tokens"), **entry},
                            published=table.get("published"))
                for table in raw["tables"]
                for name, entry in table["models"].items()
            }
        return {name: Price(**entry) for name, entry in raw.items() if not name.startswith("_")}
    except (ValidationError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigurationError(origin, f"not a valid price table: {exc}") from exc


def _catalogue_from_json(raw: dict[str, Any], origin: str) -> Catalogue:
    try:
        retired = {name: Retirement(**entry, source=group.get("source"))
                   for group in raw.get("retired", []) for name, entry in group["models"].items()}
        unpriced = {str(name): str(reason) for name, reason in raw.get("unpriced", {}).items()}
    except (ValidationError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigurationError(origin, f"not a valid retirement or unpriced list: {exc}") from exc
    return Catalogue(_table_from_json(raw, origin), retired, unpriced)


@lru_cache(maxsize=1)
def published() -> Catalogue:
    """The prices, retirements and unpriced models in `prices.json` (read once)."""
    return _catalogue_from_json(json.loads(files("factory").joinpath("prices.json").read_text()), "prices.json")


def configured_prices(settings: FactorySettings) -> dict[str, Price]:
    """The prices the deployment sets: the file's, then the inline JSON's on top."""
    table: dict[str, Price] = {}
    if settings.prices_file is not None:
        try:
            raw = json.loads(settings.prices_file.expanduser().read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigurationError("FACTORY_PRICES_FILE", f"cannot read {settings.prices_file}: {exc}") from exc
        table.update(_table_from_json(raw, "FACTORY_PRICES_FILE"))
    if settings.prices:
        try:
            raw = json.loads(settings.prices)
        except json.JSONDecodeError as exc:
            raise ConfigurationError("FACTORY_PRICES", f"not valid JSON: {exc}") from exc
        table.update(_table_from_json(raw, "FACTORY_PRICES"))
    return table


def price_table(settings: FactorySettings) -> dict[str, Price]:
    """Published prices, overridden by the file and then the inline JSON from settings."""
    return {**published().prices, **configured_prices(settings)}


def retirement(model: str) -> Retirement | None:
    """The provider's retirement of `model` (past or scheduled) that `prices.json` records, if any.

    Anthropic's retirements live in the Anthropic SDK's own table, which preflight reads; this one holds
    the rest (OpenAI publishes its shutdowns only on its deprecations page).
    """
    retired = published().retired
    return retired.get(model) or retired.get(_bare(model))


def price_for(model: str, settings: FactorySettings, field: str = "model", today: dt.date | None = None) -> Price:
    """The price of `model`, or a ConfigurationError: an unpriced or retired model cannot be budgeted.

    Args:
        model: the model name as the job gives it, routing prefix (`openai:`, `anthropic:`) and all.
        settings: where configured prices come from; they win over `prices.json`.
        field: the job field or setting to name in the error.
        today: the date retirements are judged against (default: today).

    Raises:
        ConfigurationError: naming `field`, the model, why it has no price, and how to configure one.

    Example:
        >>> price_for("gpt-4o-mini", get_settings()).input
        Decimal('0.15')
    """
    configured = configured_prices(settings)
    bare = _bare(model)
    price = configured.get(model) or configured.get(bare)
    if price is not None:
        return price
    example = f"FACTORY_PRICES='{{\"{model}\": {{\"input\": 1.0, \"output\": 5.0}}}}'"
    retired = retirement(model)
    if retired is not None and retired.date <= (today or dt.date.today()):
        instead = f"'{retired.replacement}' (its provider's replacement) or " if retired.replacement else ""
        raise ConfigurationError(
            field, f"model '{model}' was retired by its provider on {retired.date.isoformat()}; use {instead}a "
            f"current model such as '{settings.default_executor_model}'. If a server you use still serves it, "
            f"set its price to use it, e.g. {example}.")
    catalogue = published()
    price = catalogue.prices.get(model) or catalogue.prices.get(bare)
    if price is not None:
        return price
    reason = catalogue.unpriced.get(model) or catalogue.unpriced.get(bare)
    if reason is not None:
        raise ConfigurationError(
            field, f"model '{model}' is not priced because {reason}, so the budget could not be enforced. "
            f"Set FACTORY_PRICES to price it (USD per million tokens), e.g. {example}.")
    raise ConfigurationError(
        field,
        f"no price is known for model '{model}', so the budget could not be enforced. "
        f"Set its price per million tokens, e.g. {example}, or pick a priced model: "
        f"{', '.join(sorted(catalogue.prices)[:8])}, ...",
    )


def _bare(model: str) -> str:
    return model.split(":", 1)[1] if ":" in model else model
