"""One billed model call, shared by the generate and evaluate tasks: bounded by the deadline,
priced from its usage, keyed for Prefect's cache by everything that changes its answer."""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from decimal import Decimal
from typing import Any

from prefect.context import TaskRunContext

from blocks.credentials import api_key_for
from factory.errors import DeadlineExceeded, TransientProviderError
from factory.models import CallRecord, StrictModel
from factory.pricing import Price
from factory.providers import ChatReply, ChatRequest, Provider, make_provider
from factory.settings import get_settings


# Provider clients hold connection pools bound to the event loop that made them: one set per loop.
_providers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], Provider]] = (
    weakref.WeakKeyDictionary())


async def provider_client(provider: str) -> Provider:
    """The running loop's client for `provider` and its current key, built on first use."""
    key = await api_key_for(provider)
    clients = _providers.setdefault(asyncio.get_running_loop(), {})
    slot = (provider, key.get_secret_value() if key else "")
    if slot not in clients:
        clients[slot] = make_provider(provider, key)
    return clients[slot]


class CallResult(StrictModel):
    reply: ChatReply
    call: CallRecord


def call_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """`<job>-<iteration>-<role>-<hash of provider + request>`; deadline and price are left out."""
    request: ChatRequest = parameters["request"]
    digest = hashlib.sha256(f"{parameters['provider']}\n{request.model_dump_json()}".encode()).hexdigest()
    return f"factory-{parameters['job_id']}-{parameters['iteration']:03d}-{parameters['role']}-{digest[:32]}"


async def billed_call(provider: str, request: ChatRequest, price: Price, deadline: float, role: str) -> CallResult:
    """Make one call within the time left and return its reply with what it cost.

    Raises:
        DeadlineExceeded: no time is left, or the call ran into the deadline.
        TransientProviderError, ProviderAuthError, ProviderRequestError: from the provider.
    """
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded(f"the job's deadline passed before the {role} call")
    timeout = min(get_settings().request_timeout_s, left)
    client = await provider_client(provider)
    started = time.perf_counter()
    try:
        reply = await client.complete(request, timeout_s=timeout)
    except TransientProviderError as exc:
        if deadline - time.time() <= 0:
            raise DeadlineExceeded(f"the {role} call ran into the job's deadline") from exc
        raise
    duration_ms = int((time.perf_counter() - started) * 1000)
    cost: Decimal = price.cost(reply.usage)
    record = CallRecord(role=role, model=request.model, usage=reply.usage, cost_usd=cost, duration_ms=duration_ms)
    return CallResult(reply=reply, call=record)
