"""The error boundary of the media providers spoken to with plain httpx (fal, ElevenLabs).

Every request goes through `send`, which maps a refusal with `status_error`, as `translate_sdk_error` does for
the SDK-backed providers: 401/403 -> ProviderAuthError; 408/409/429/5xx, timeouts and dropped connections ->
TransientProviderError (with the reply's `retry-after`); any other 4xx -> ProviderRequestError. Example::

    async with deadline(model, timeout_s):
        reply = parse(await send(client, "POST", url, model=model, timeout_s=timeout_s, json=body), Reply, model)
        data, media_type = await fetch_media(client, reply.url, model=model, timeout_s=timeout_s)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import httpx
import pydantic

from factory.errors import TransientProviderError
from factory.providers.base import MALFORMED, status_error

EXCERPT_CHARS = 300
# Request headers that carry a key: their values are cut out of any reply text an error quotes.
SECRET_HEADERS = ("authorization", "xi-api-key")
# Bodies that are an error or a page, not media, whatever the status said.
NOT_MEDIA_TYPES = ("application/json", "text/")

ReplyT = TypeVar("ReplyT", bound=pydantic.BaseModel)


class Reply(pydantic.BaseModel):
    """Base of the reply shapes we read: providers add fields freely, so unknown ones are ignored."""

    model_config = pydantic.ConfigDict(extra="ignore")


async def send(client: httpx.AsyncClient, method: str, url: str, *, model: str, timeout_s: float,
               **kwargs: Any) -> httpx.Response:
    """Send one request and return its successful reply.

    Args:
        timeout_s: bounds each phase (connect, each read); wrap a whole call in `deadline` for a total bound.
        kwargs: passed to `httpx.AsyncClient.request` (json, params, headers).

    Raises:
        TransientProviderError: a timeout, a dropped connection, or HTTP 408/409/429/5xx.
        ProviderAuthError: HTTP 401/403.
        ProviderRequestError: any other refusal, quoting the start of the reply.
    """
    # Once the request is sent the provider may bill it, whatever became of the reply: charged its worst case.
    try:
        response = await client.request(method, url, timeout=timeout_s, **kwargs)
    except httpx.TimeoutException as exc:
        raise TransientProviderError(model, f"the call timed out after {timeout_s:g}s",
                                     billed_unknown=not isinstance(exc, httpx.ConnectTimeout)) from exc
    except httpx.TransportError as exc:
        raise TransientProviderError(model, f"connection failed: {type(exc).__name__}: {exc}",
                                     billed_unknown=not isinstance(exc, httpx.ConnectError)) from exc
    check_status(response, model)
    return response


def check_status(response: httpx.Response, model: str) -> None:
    """Raise the error a non-2xx reply means (see `send`)."""
    if not response.is_success:
        raise status_error(model, response, _excerpt(response))


def parse(response: httpx.Response, shape: type[ReplyT], model: str) -> ReplyT:
    """The reply's JSON body read as `shape`.

    Raises:
        TransientProviderError: the body is not JSON, or not of that shape (a 2xx reply: maybe billed).
    """
    try:
        return shape.model_validate_json(response.content)
    except pydantic.ValidationError as exc:
        raise TransientProviderError(model, MALFORMED, billed_unknown=True) from exc


def media_body(response: httpx.Response, model: str) -> tuple[bytes, str | None]:
    """A media reply's bytes and declared type.

    Raises:
        TransientProviderError: the body is empty, or JSON or text where media was due.
    """
    media_type = content_type(response)
    if not response.content or (media_type or "").startswith(NOT_MEDIA_TYPES):
        raise TransientProviderError(model, MALFORMED)
    return response.content, media_type


async def fetch_media(client: httpx.AsyncClient, url: str, *, model: str,
                      timeout_s: float) -> tuple[bytes, str | None]:
    """The bytes a result URL names, and their media type if declared.

    The URL is `http(s)` (a provider's file store, fetched without the provider's key) or a `data:` URI.

    Raises:
        TransientProviderError: the URL or its body is not media; the faults of `send`.
    """
    if url.startswith("data:"):
        return _data_uri(url, model)
    if not url.startswith(("https://", "http://")):
        raise TransientProviderError(model, MALFORMED)
    return media_body(await send(client, "GET", url, model=model, timeout_s=timeout_s), model)


@asynccontextmanager
async def deadline(model: str, timeout_s: float) -> AsyncIterator[None]:
    """Bound everything inside to `timeout_s` in all.

    Raises:
        TransientProviderError: the time ran out.
    """
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError as exc:
        raise TransientProviderError(model, f"the call took longer than {timeout_s:g}s", billed_unknown=True) from exc


def content_type(response: httpx.Response) -> str | None:
    """The reply's MIME type, lowercase and without parameters; None where it names none."""
    value = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return value or None


def _data_uri(url: str, model: str) -> tuple[bytes, str | None]:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise TransientProviderError(model, MALFORMED)
    media_type = header.split(";", 1)[0] or None
    if not header.endswith(";base64"):
        return unquote_to_bytes(payload), media_type
    try:
        return base64.b64decode(payload, validate=True), media_type
    except binascii.Error as exc:
        raise TransientProviderError(model, MALFORMED) from exc


def _excerpt(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    # A reply that echoes the request must not carry the key into an error message or a log.
    for name in SECRET_HEADERS:
        value = response.request.headers.get(name, "")
        for secret in {value, value.partition(" ")[2]} - {""}:
            text = text.replace(secret, "***")
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."
