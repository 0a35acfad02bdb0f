"""One billed model call, shared by the generate and evaluate tasks: bounded by the deadline,
priced from its usage, keyed for Prefect's cache by everything that changes its answer."""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from decimal import Decimal
from collections.abc import Callable
from typing import Any, TypeVar

from prefect.context import TaskRunContext
from pydantic import SecretStr

from blocks.credentials import api_key_for
from factory.errors import DeadlineExceeded, TransientProviderError
from factory.models import CallRecord, StrictModel
from factory.pricing import Price
from factory.providers import ChatReply, ChatRequest, Provider, make_provider
from factory.settings import get_settings


C = TypeVar("C")
# Provider clients hold connection pools bound to the event loop that made them: one set per loop.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Callable, str, str], Any]] = (
    weakref.WeakKeyDictionary())


async def client_for(provider: str, make: Callable[[str, SecretStr | None], C]) -> C:
    """The running loop's client made by `make` for `provider` and its current key, built on first use."""
    key = await api_key_for(provider)
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    slot = (make, provider, key.get_secret_value() if key else "")
    if slot not in clients:
        clients[slot] = make(provider, key)
    return clients[slot]


class CallResult(StrictModel):
    reply: ChatReply
    call: CallRecord


def call_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """`<job>-<iteration>-<role>-<hash of provider + request>`; deadline and price are left out."""
    request = parameters["request"]
    digest = hashlib.sha256(f"{parameters['provider']}\n{request.model_dump_json()}".encode()).hexdigest()
    return f"factory-{parameters['job_id']}-{parameters['iteration']:03d}-{parameters['role']}-{digest[:32]}"


def time_left(deadline: float, role: str, bound_s: float | None = None) -> float:
    """Seconds one call may take: `bound_s` (default: the provider timeout), or less when the job's deadline
    is nearer.

    Raises:
        DeadlineExceeded: no time is left.
    """
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceeded(f"the job's deadline passed before the {role} call")
    return min(get_settings().request_timeout_s if bound_s is None else bound_s, left)


async def billed_call(provider: str, request: ChatRequest, price: Price, deadline: float, role: str) -> CallResult:
    """Make one call within the time left and return its reply with what it cost.

    Raises:
        DeadlineExceeded: no time is left, or the call ran into the deadline.
        TransientProviderError, ProviderAuthError, ProviderRequestError: from the provider.
    """
    timeout = time_left(deadline, role)
    client: Provider = await client_for(provider, make_provider)
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
