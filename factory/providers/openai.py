"""OpenAI Chat Completions through the official async SDK, and any OpenAI-compatible server.

`OPENAI_BASE_URL` points it at vLLM, Ollama, llama.cpp or a RunPod vLLM endpoint; such models
are named with the `openai:` prefix (`openai:meta-llama/Llama-3.3-70B-Instruct`) and need a
configured price.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pydantic
from pydantic import SecretStr

from factory.errors import TransientProviderError
from factory.models import Usage
from factory.providers.base import MALFORMED, ChatReply, ChatRequest, ImagePart, Message, Provider, translate_sdk_error


class OpenAIProvider(Provider):
    """OpenAI's chat models, or an OpenAI-compatible server's (`compatible`)."""

    name = "openai"

    def __init__(self, api_key: SecretStr | None = None, *, compatible: bool = False) -> None:
        # OpenAI's own models take `max_completion_tokens`; most compatible servers only `max_tokens`.
        self._compatible = compatible
        key = api_key.get_secret_value() if api_key else None
        if key is None and compatible:
            key = "not-needed"  # local servers commonly take no key; the SDK insists on one
        # One client (and connection pool) per provider object: building one costs ~20 ms of TLS set-up.
        self._client = openai.AsyncOpenAI(api_key=key, max_retries=0)

    async def aclose(self) -> None:
        """Close the SDK client."""
        await self._client.close()

    async def complete(self, request: ChatRequest, *, timeout_s: float) -> ChatReply:
        """One Chat Completions call; a `response_schema` is asked for as strict `json_schema` output."""
        messages = [{"role": "system", "content": request.system},
                    *({"role": m.role, "content": _content(m)} for m in request.messages)]
        kwargs: dict[str, Any] = {"model": request.model, "messages": messages}
        kwargs["max_tokens" if self._compatible else "max_completion_tokens"] = request.max_tokens
        if request.cache_key and not self._compatible:  # OpenAI caches prompt prefixes by itself; the key routes
            kwargs["prompt_cache_key"] = request.cache_key
        if request.response_schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": request.schema_name, "schema": request.response_schema, "strict": True},
            }
        try:
            completion = await self._client.chat.completions.create(**kwargs, timeout=timeout_s)
        except (openai.OpenAIError, json.JSONDecodeError, pydantic.ValidationError) as exc:
            raise translate_sdk_error(exc, request.model, openai) from exc
        return _reply(completion, request)


def _content(message: Message) -> str | list[dict[str, Any]]:
    if isinstance(message.content, str):
        return message.content
    return [{"type": "image_url", "image_url": {"url": f"data:{p.media_type};base64,{p.data}"}}
            if isinstance(p, ImagePart) else {"type": "text", "text": p.text} for p in message.content]


def _reply(completion: Any, request: ChatRequest) -> ChatReply:
    # The SDK builds replies without validating them: a 200 body may lack what the API documents.
    raw_usage = getattr(completion, "usage", None)
    usage = _usage(raw_usage) if raw_usage is not None else None
    choices = getattr(completion, "choices", None)
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = getattr(choice, "message", None)
    if message is None:
        raise TransientProviderError(request.model, f"{MALFORMED}: it has no `choices[0].message`", billed=usage,
                                     billed_unknown=True)
    text = getattr(message, "content", None) or ""
    structured = None
    if request.response_schema is not None and text:
        try:
            parsed = json.loads(text)
            structured = parsed if isinstance(parsed, dict) else None
        except json.JSONDecodeError:
            structured = None  # left to the verdict parser's repair path
    return ChatReply(text=text, structured=structured, usage=usage or Usage(), usage_known=usage is not None,
                     model=getattr(completion, "model", None) or request.model,
                     stop_reason=getattr(choice, "finish_reason", None))


def _usage(usage: Any) -> Usage:
    """Billed tokens: `completion_tokens` whole (it includes a reasoning model's reasoning tokens), cached prompt
    tokens at the cache-read price, prompt tokens written to the cache at the cache-write price."""
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
    written = (getattr(details, "cache_write_tokens", 0) or 0) if details else 0  # GPT-5.6 on: 1.25x input
    return Usage(
        input_tokens=(usage.prompt_tokens or 0) - cached - written,
        output_tokens=usage.completion_tokens or 0,
        cache_read_tokens=cached,
        cache_write_5m_tokens=written,
    )
