"""Provider keys on a long-running worker: read once per TTL, a rotated key picked up, a missing key never kept."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from blocks import credentials
from factory.settings import FactorySettings

pytestmark = pytest.mark.fast


@pytest.fixture
def block(monkeypatch):
    """The `anthropic-api-key` Secret block as the API serves it, counting reads; the clock, made to move."""
    state = {"value": "sk-ant-first", "reads": 0, "now": 1000.0}

    async def from_block(name: str) -> SecretStr | None:
        state["reads"] += 1
        return SecretStr(state["value"]) if state["value"] else None

    monkeypatch.setattr(credentials, "_cache", {})
    monkeypatch.setattr(credentials, "_from_block", from_block)
    monkeypatch.setattr(credentials, "get_settings", lambda: FactorySettings(secret_ttl_s=300))
    monkeypatch.setattr(credentials, "_clock", lambda: state["now"])
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    return state


async def test_a_key_is_read_once_per_ttl_and_a_rotated_key_arrives_after_it(block):
    for _ in range(5):
        assert (await credentials.api_key_for("anthropic")).get_secret_value() == "sk-ant-first"
    assert block["reads"] == 1
    block["value"], block["now"] = "sk-ant-rotated", block["now"] + 299
    assert (await credentials.api_key_for("anthropic")).get_secret_value() == "sk-ant-first"
    block["now"] += 2
    assert (await credentials.api_key_for("anthropic")).get_secret_value() == "sk-ant-rotated"
    assert block["reads"] == 2


async def test_a_missing_key_is_looked_up_again_so_a_block_created_later_serves_the_next_job(block):
    block["value"] = None
    assert await credentials.api_key_for("anthropic") is None
    assert await credentials.api_key_for("anthropic") is None
    block["value"] = "sk-ant-created-later"
    assert (await credentials.api_key_for("anthropic")).get_secret_value() == "sk-ant-created-later"
    assert block["reads"] == 3
