"""Model providers, chosen by model name.

`claude-*` -> Anthropic; `gpt-*`, `o<digit>*`, `chatgpt-*` -> OpenAI; `openai:<name>` -> an
OpenAI-compatible server at `OPENAI_BASE_URL`; `anthropic:<name>` forces Anthropic;
`dry-run` -> no model at all.
"""

from __future__ import annotations

import re

from pydantic import SecretStr

from factory.errors import ConfigurationError
from factory.providers.base import ChatReply, ChatRequest, ImagePart, Message, Provider, TextPart
from factory.providers.dryrun import DRY_RUN_MODEL, DryRunProvider

__all__ = ["ChatReply", "ChatRequest", "ImagePart", "Message", "Provider", "TextPart", "DRY_RUN_MODEL", "provider_name",
           "api_model", "make_provider"]

_OPENAI_NAMES = re.compile(r"^(gpt-|chatgpt-|o\d)")


def provider_name(model: str, field: str = "model") -> str:
    """`anthropic`, `openai`, `openai-compatible` or `dry-run` for a model name.

    Raises:
        ConfigurationError: the name does not say which provider serves it.
    """
    if model == DRY_RUN_MODEL:
        return DRY_RUN_MODEL
    prefix, sep, rest = model.partition(":")
    if sep and rest:
        if prefix == "openai":
            return "openai-compatible"
        if prefix == "anthropic":
            return "anthropic"
    if model.startswith("claude-"):
        return "anthropic"
    if _OPENAI_NAMES.match(model):
        return "openai"
    raise ConfigurationError(
        field,
        f"cannot tell which provider serves model '{model}'. Use a Claude or OpenAI model name, "
        f"'openai:{model}' for an OpenAI-compatible server at OPENAI_BASE_URL, or '{DRY_RUN_MODEL}'.",
    )


def api_model(model: str) -> str:
    """The name the provider's API expects (the routing prefix removed)."""
    prefix, sep, rest = model.partition(":")
    return rest if sep and prefix in ("openai", "anthropic") else model


def make_provider(provider: str, api_key: SecretStr | None) -> Provider:
    """The provider `provider_name` returned; any name but anthropic and openai(-compatible) gets the dry run."""
    # SDKs are imported on first use: each costs 0.5-1.5 s of start-up in every flow-run process.
    if provider == "anthropic":
        from factory.providers.anthropic import AnthropicProvider
        return AnthropicProvider(api_key)
    if provider in ("openai", "openai-compatible"):
        from factory.providers.openai import OpenAIProvider
        return OpenAIProvider(api_key, compatible=provider == "openai-compatible")
    return DryRunProvider()
