"""The one small interface every model provider implements, and the SDK error boundary.

A provider turns a `ChatRequest` into a `ChatReply` carrying the tokens it was billed for.
SDK clients are built with `max_retries=0`: retrying is the Prefect task's job (see
`tasks/retry.py`), so a fault is retried by exactly one layer.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any, Literal

import httpx
import pydantic
from pydantic import Field

from factory.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderRequestError,
    TransientProviderError,
)
from factory.models import StrictModel, Usage

MALFORMED = "the provider's reply was malformed"
# Framing a provider adds around each message and the request (roles, separators): counted generously.
MESSAGE_OVERHEAD_TOKENS = 16
REQUEST_OVERHEAD_TOKENS = 128
# The most one image can be billed as input: Anthropic resizes to at most ~1.15 MP (~1,600 tokens; ~4,800 on
# high-resolution models), OpenAI's high detail stays under ~2,500. Doubled for safety.
IMAGE_TOKEN_BOUND = 10_000


class TextPart(StrictModel):
    """A message's text part."""

    type: Literal["text"] = "text"
    text: str
    cache_point: bool = Field(default=False, description="The stable prefix of the prompt ends here: a provider "
                              "with explicit cache breakpoints (Anthropic's `cache_control`) puts one here.")


class ImagePart(StrictModel):
    """A message's image part: a PNG, JPEG, GIF or WebP image, base64-encoded."""

    type: Literal["image"] = "image"
    media_type: Literal["image/png", "image/jpeg", "image/gif", "image/webp"]
    data: str = Field(description="base64")


class Message(StrictModel):
    """One turn of the conversation: plain text, or text and image parts."""

    role: Literal["user", "assistant"]
    content: str | list[TextPart | ImagePart]

    @classmethod
    def user(cls, text: str, images: list[ImagePart], *, stable: str = "", images_change: bool = False) -> Message:
        """A user message: the text alone, or the images first and then the text, as Anthropic advises.

        With a `stable` prefix (the same on every call of a job) it comes first and ends at a cache point;
        images that change from call to call (`images_change`, an artifact being judged) come after it.
        """
        if not stable:
            return cls(role="user", content=[*images, TextPart(text=text)] if images else text)
        head: list[TextPart | ImagePart] = [TextPart(text=stable, cache_point=True)]
        tail: list[TextPart | ImagePart] = [TextPart(text=text)] if text else []
        return cls(role="user", content=[*head, *images, *tail] if images_change else [*images, *head, *tail])

    def text(self) -> str:
        """The message's text, its text parts joined by newlines; images left out."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if isinstance(part, TextPart))

    def images(self) -> list[ImagePart]:
        """The message's images, in order."""
        return [] if isinstance(self.content, str) else [p for p in self.content if isinstance(p, ImagePart)]


class ChatRequest(StrictModel):
    """What to ask a model. Everything here changes the answer, so all of it is in the cache key."""

    model: str
    system: str
    messages: list[Message]
    max_tokens: int = Field(ge=1)
    response_schema: dict[str, Any] | None = None
    schema_name: str = "submit_verdict"
    schema_description: str = ""
    cache_key: str | None = Field(default=None, description="Groups calls that share a prompt prefix (OpenAI's "
                                  "`prompt_cache_key`), so they land where that prefix is cached.")

    def input_token_bound(self) -> int:
        """An over-estimate of the input tokens: a token never covers less than one UTF-8 byte."""
        texts = [self.system, *(m.text() for m in self.messages)]
        if self.response_schema is not None:
            texts.append(json.dumps(self.response_schema) + self.schema_name + self.schema_description)
        images = sum(len(m.images()) for m in self.messages)
        return (sum(len(t.encode()) for t in texts) + MESSAGE_OVERHEAD_TOKENS * len(self.messages)
                + REQUEST_OVERHEAD_TOKENS + IMAGE_TOKEN_BOUND * images)


class ChatReply(StrictModel):
    """A model's answer: its text, any structured output, and the tokens it was billed for."""

    text: str
    structured: dict[str, Any] | None = None
    usage: Usage
    usage_known: bool = Field(default=True, description="False: the reply carried no usage (some OpenAI-compatible "
                                                         "servers omit it), so the call is charged its worst case.")
    model: str
    stop_reason: str | None = None


class Provider(ABC):
    """A model provider: one async call, typed in and out."""

    name: str

    @abstractmethod
    async def complete(self, request: ChatRequest, *, timeout_s: float) -> ChatReply:
        """Run one call.

        Raises:
            TransientProviderError: worth retrying.
            ProviderAuthError, ProviderRequestError: not worth retrying.
        """

    async def aclose(self) -> None:  # noqa: B027 - a default, not abstract: most hold nothing to close
        """Release the provider's connections (a no-op where it holds none)."""


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                continue
    return None


def translate_sdk_error(exc: Exception, model: str, sdk: ModuleType) -> ProviderError:
    """Map an anthropic/openai SDK exception (same Stainless hierarchy) to our own classes."""
    # Once the request is sent the provider may bill it, whatever became of the reply: charged its worst case.
    sent = not isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout)
    if isinstance(exc, sdk.APITimeoutError):
        return TransientProviderError(model, "the call timed out", billed_unknown=sent)
    if isinstance(exc, sdk.APIConnectionError):
        return TransientProviderError(model, f"connection failed: {exc}", billed_unknown=sent)
    if isinstance(exc, sdk.APIResponseValidationError | json.JSONDecodeError | pydantic.ValidationError):
        return TransientProviderError(model, MALFORMED, billed_unknown=True)
    if isinstance(exc, sdk.APIStatusError):
        if exc.status_code == 429 and getattr(exc, "code", None) == "insufficient_quota":
            return ProviderRequestError(model, "the account has no quota left (HTTP 429 insufficient_quota).")
        return status_error(model, exc.response, _short(exc))
    raise exc


def status_error(model: str, response: httpx.Response, detail: str) -> ProviderError:
    """The error an HTTP refusal means, for SDK and plain-HTTP providers alike: a refused key, a fault worth
    retrying (408, 409, 429, 5xx; after any retry-after), or a request not worth sending again."""
    status = response.status_code
    if status in (401, 403):
        return ProviderAuthError(model, f"the API key was refused (HTTP {status}). Check the key for this provider.")
    if status in (408, 409, 429) or status >= 500:
        return TransientProviderError(model, f"HTTP {status}: {detail}", _retry_after(response))
    return ProviderRequestError(model, f"the request was rejected (HTTP {status}): {detail}")


def _short(exc: Exception, limit: int = 300) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text if len(text) <= limit else text[:limit] + "..."
