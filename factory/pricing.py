"""Prices per model as data, and the exact cost of a call.

`prices.json` beside this module holds the published tables (with their date and source);
`FACTORY_PRICES` (inline JSON) or `FACTORY_PRICES_FILE` adds or overrides entries, e.g. for a
self-hosted model behind an OpenAI-compatible server::

    FACTORY_PRICES='{"openai:llama-3.3-70b": {"input": 0.0, "output": 0.0}}'

Costs are computed in `Decimal` so that a job's total equals the sum of its calls exactly.
"""

from __future__ import annotations

import json
from decimal import Decimal
from functools import lru_cache
from importlib.resources import files

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.errors import ConfigurationError
from factory.models import Usage
from factory.settings import FactorySettings

PER_TOKENS = Decimal(1_000_000)


class Price(BaseModel):
    """USD per million tokens, and per media unit. Cache prices default to the input price when a table
    omits them; a unit the table does not name costs nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Decimal = Field(default=Decimal(0), ge=0)
    output: Decimal = Field(default=Decimal(0), ge=0)
    cache_read: Decimal | None = Field(default=None, ge=0)
    cache_write_5m: Decimal | None = Field(default=None, ge=0)
    cache_write_1h: Decimal | None = Field(default=None, ge=0)
    per_image: Decimal = Field(default=Decimal(0), ge=0)
    per_megapixel: Decimal = Field(default=Decimal(0), ge=0)
    per_million_characters: Decimal = Field(default=Decimal(0), ge=0)
    per_second: Decimal = Field(default=Decimal(0), ge=0, description="Per second of media made or transcribed.")
    per_gpu_second: Decimal = Field(default=Decimal(0), ge=0)
    published: str | None = None

    def cost(self, usage: Usage) -> Decimal:
        """The exact USD cost of `usage` at this price."""
        parts = (
            (usage.input_tokens, self.input),
            (usage.output_tokens, self.output),
            (usage.cache_read_tokens, self.cache_read if self.cache_read is not None else self.input),
            (usage.cache_write_5m_tokens, self.cache_write_5m if self.cache_write_5m is not None else self.input),
            (usage.cache_write_1h_tokens, self.cache_write_1h if self.cache_write_1h is not None else self.input),
        )
        tokens = sum((Decimal(tokens) * price for tokens, price in parts), Decimal(0)) / PER_TOKENS
        return tokens + self._units(usage)

    def _units(self, usage: Usage) -> Decimal:
        return (usage.images * self.per_image + usage.megapixels * self.per_megapixel
                + usage.characters * self.per_million_characters / PER_TOKENS
                + usage.media_seconds * self.per_second + usage.gpu_seconds * self.per_gpu_second)

    def worst_case(self, input_tokens: int, max_output_tokens: int) -> Decimal:
        """The most a call with at most these tokens can cost (input billed at its dearest rate)."""
        dearest_input = max(p for p in (self.input, self.cache_write_5m, self.cache_write_1h) if p is not None)
        return (Decimal(input_tokens) * dearest_input + Decimal(max_output_tokens) * self.output) / PER_TOKENS


def _table_from_json(raw: dict, origin: str) -> dict[str, Price]:
    try:
        if "tables" in raw:
            return {
                name: Price(**entry, published=table.get("published"))
                for table in raw["tables"]
                for name, entry in table["models"].items()
            }
        return {name: Price(**entry) for name, entry in raw.items()}
    except (ValidationError, TypeError, KeyError) as exc:
        raise ConfigurationError(origin, f"not a valid price table: {exc}") from exc


@lru_cache(maxsize=1)
def _published() -> dict[str, Price]:
    return _table_from_json(json.loads(files("factory").joinpath("prices.json").read_text()), "prices.json")


def price_table(settings: FactorySettings) -> dict[str, Price]:
    """Published prices, overridden by the file and then the inline JSON from settings."""
    table = dict(_published())
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


def price_for(model: str, settings: FactorySettings, field: str = "model") -> Price:
    """The price of `model`, or a ConfigurationError: an unpriced model cannot be budgeted.

    Raises:
        ConfigurationError: naming `field`, the model, and how to configure a price.
    """
    table = price_table(settings)
    bare = model.split(":", 1)[1] if ":" in model else model
    price = table.get(model) or table.get(bare)
    if price is None:
        raise ConfigurationError(
            field,
            f"no price is known for model '{model}', so the budget could not be enforced. "
            f"Set its price per million tokens, e.g. FACTORY_PRICES='{{\"{model}\": "
            f"{{\"input\": 1.0, \"output\": 5.0}}}}', or pick a priced model: {', '.join(sorted(table)[:8])}, ...",
        )
    return price
