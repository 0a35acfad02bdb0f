"""Anthropic Messages API through the official async SDK (`ANTHROPIC_BASE_URL` is honoured)."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pydantic
from pydantic import SecretStr

from factory.errors import TransientProviderError
from factory.models import Usage
from factory.providers.base import (
    MALFORMED,
    ChatReply,
    ChatRequest,
    ImagePart,
    Message,
    Provider,
    TextPart,
    translate_sdk_error,
)

# Models that answer 400 to a forced `tool_choice` ("tool" or "any"): they get the tool with
# `auto` and an instruction to call it; a reply without the call goes to the repair path.
NO_FORCED_TOOL_CHOICE = frozenset({"claude-sonnet-5-5", "claude-fable-5-1", "claude-mythos-5-1"})


class AnthropicProvider(Provider):
    """Claude models; a response schema becomes a tool the model is made to call where it allows that."""

    name = "anthropic"

    def __init__(self, api_key: SecretStr | None = None) -> None:
        # One client (and connection pool) per provider object: building one costs ~20 ms of TLS set-up.
        self._client = anthropic.AsyncAnthropic(api_key=api_key.get_secret_value() if api_key else None,
                                                max_retries=0)

    async def aclose(self) -> None:
        """Close the SDK client."""
        await self._client.close()

    async def complete(self, request: ChatRequest, *, timeout_s: float) -> ChatReply:
        """One Messages call; a `response_schema` is asked for as a tool call, read back as `structured`."""
        kwargs: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "system": request.system,
            "messages": [{"role": m.role, "content": _content(m)} for m in request.messages],
        }
        if request.response_schema is not None:
            kwargs["tools"] = [{
                "name": request.schema_name,
                "description": request.schema_description,
                "input_schema": request.response_schema,
            }]
            forced = request.model not in NO_FORCED_TOOL_CHOICE
            kwargs["tool_choice"] = {"type": "tool", "name": request.schema_name} if forced else {"type": "auto"}
        try:
            message = await self._client.messages.create(**kwargs, timeout=timeout_s)
        except (anthropic.AnthropicError, json.JSONDecodeError, pydantic.ValidationError) as exc:
            raise translate_sdk_error(exc, request.model, anthropic) from exc
        return _reply(message, request)


def _content(message: Message) -> str | list[dict[str, Any]]:
    if isinstance(message.content, str):
        return message.content
    return [{"type": "image", "source": {"type": "base64", "media_type": p.media_type, "data": p.data}}
            if isinstance(p, ImagePart) else _text_block(p) for p in message.content]


def _text_block(part: TextPart) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": part.text}
    if part.cache_point:  # everything up to here (tools, system, this block) is cached for 5 minutes
        block["cache_control"] = {"type": "ephemeral"}
    return block


def _reply(message: anthropic.types.Message, request: ChatRequest) -> ChatReply:
    # The SDK builds replies without validating them: a 200 body may lack what the API documents.
    raw_usage = getattr(message, "usage", None)
    usage = _usage(raw_usage) if raw_usage is not None else None
    content = getattr(message, "content", None)
    if not isinstance(content, list):
        raise TransientProviderError(request.model, f"{MALFORMED}: it has no `content`", billed=usage,
                                     billed_unknown=True)
    text = "".join(block.text for block in content if block.type == "text")
    structured = next(
        (block.input for block in content
         if block.type == "tool_use" and block.name == request.schema_name and isinstance(block.input, dict)),
        None,
    )
    return ChatReply(text=text, structured=structured, usage=usage or Usage(), usage_known=usage is not None,
                     model=getattr(message, "model", None) or request.model,
                     stop_reason=getattr(message, "stop_reason", None))


def _usage(usage: anthropic.types.Usage) -> Usage:
    created = usage.cache_creation_input_tokens or 0
    split = getattr(usage, "cache_creation", None)
    write_1h = (getattr(split, "ephemeral_1h_input_tokens", 0) or 0) if split else 0
    return Usage(
        input_tokens=usage.input_tokens or 0,
        output_tokens=usage.output_tokens or 0,
        cache_read_tokens=usage.cache_read_input_tokens or 0,
        cache_write_5m_tokens=created - write_1h,
        cache_write_1h_tokens=write_1h,
    )
