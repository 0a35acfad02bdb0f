"""One billed model call, shared by the generate and evaluate tasks: retried within the budget and the deadline,
priced from its usage, keyed for Prefect's cache by everything that changes its answer."""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from prefect.context import TaskRunContext
from pydantic import Field, SecretStr

from blocks.credentials import api_key_for
from factory.models import CallRecord, StrictModel, Usage
from factory.providers import ChatReply, ChatRequest, Provider, make_provider
from tasks.retry import Allowance, Call, with_retries

C = TypeVar("C")
# Provider clients hold connection pools bound to the event loop that made them: one set per loop.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Callable[..., Any], str, str], Any]] = (
    weakref.WeakKeyDictionary())


async def client_for(provider: str, make: Callable[[str, SecretStr | None], C]) -> C:
    """The running loop's client made by `make` for `provider` and its current key, built on first use."""
    key = await api_key_for(provider)
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    slot = (make, provider, key.get_secret_value() if key else "")
    if slot not in clients:
        clients[slot] = make(provider, key)
    client: C = clients[slot]
    return client


class CallResult(StrictModel):
    reply: ChatReply
    calls: list[CallRecord] = Field(min_length=1, description="Every billed attempt, the one that answered last.")

    @property
    def call(self) -> CallRecord:
        return self.calls[-1]


def call_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """`<job>-<iteration>-<role>-<hash of provider + request>`; the allowance (budget, price, deadline) is left out."""
    request = parameters["request"]
    digest = hashlib.sha256(f"{parameters['provider']}\n{request.model_dump_json()}".encode()).hexdigest()
    return f"factory-{parameters['job_id']}-{parameters['iteration']:03d}-{parameters['role']}-{digest[:32]}"


async def billed_call(provider: str, request: ChatRequest, call: Call, allowance: Allowance) -> CallResult:
    """Make one chat call, retried on transient faults within the budget and the time left.

    Raises:
        BudgetExceeded, DeadlineExceeded: the call no longer fits.
        TransientProviderError, ProviderAuthError, ProviderRequestError: from the provider.
    """
    client: Provider = await client_for(provider, make_provider)

    async def attempt(timeout_s: float) -> tuple[ChatReply, Usage | None]:
        reply = await client.complete(request, timeout_s=timeout_s)
        return reply, reply.usage if reply.usage_known else None

    reply, records = await with_retries(attempt, call, allowance)
    return CallResult(reply=reply, calls=records)
