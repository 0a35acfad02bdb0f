"""send_callback: POST a job's JobResult to its `callback_url`, signed, retried for a bounded time.

A plain async function, not a Prefect task: it runs in the flow's state hooks, some of them in the worker after
the flow's process has ended, where a task run would have no flow run to belong to; and its retries are its own
(one layer, as for provider calls), bounded by `FACTORY_CALLBACK_RETRY_WINDOW_S` in all.

No DNS rebinding: every attempt resolves the host once (factory/callback.py `check_destination`), checks every
address, and connects to a checked address itself: the request's URL carries the IP, its `Host` header the name
the URL gave, and for https the TLS handshake sends that name (SNI) and verifies the certificate against it
(httpcore's `sni_hostname` extension). No proxy from the environment is used (it would do its own resolution),
and redirects are not followed.

Example::

    delivery = await send_callback(url, body, secret, settings=get_settings(), delivery_id=str(flow_run.id))
    delivery.delivered
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from pydantic import SecretStr

from factory.callback import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    AllowList,
    CallbackRefused,
    CallbackTarget,
    CallbackUnresolved,
    IPAddress,
    check_destination,
    parse_callback_url,
    signature,
)
from factory.settings import FactorySettings

USER_AGENT = "the-factory-callback/1"
MAX_BACKOFF_S = 10.0
MIN_ATTEMPT_S = 0.05  # less left of the window than this is not worth a connection


@dataclass
class Attempt:
    """One try at delivering a callback, as the event log records it."""

    attempt: int
    url: str
    signed: bool
    address: str | None = None
    status_code: int | None = None
    error: str | None = None
    duration_ms: int = 0
    retry: bool = False  # another attempt follows
    final: bool = False  # the last one: delivered, refused, or the window is spent

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Delivery:
    url: str
    signed: bool
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def delivered(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].delivered


class _Answer(Exception):
    """A non-2xx answer, carried out of the attempt with whether it is worth another one."""

    def __init__(self, status_code: int, retry: bool, retry_after_s: float | None, why: str) -> None:
        self.status_code, self.retry, self.retry_after_s = status_code, retry, retry_after_s
        super().__init__(why)


async def send_callback(url: str, body: bytes, secret: SecretStr | None, *, settings: FactorySettings,
                        delivery_id: str, on_attempt: Callable[[Attempt], Awaitable[None]] | None = None) -> Delivery:
    """POST `body` (JSON) to `url` until a 2xx, a refusal that retrying cannot change, or the end of the window.

    Retried, with exponential backoff and jitter from `FACTORY_RETRY_DELAY_S` (a 429's or 503's `retry-after`
    honoured), on connection errors, timeouts, 429 and 5xx; never on a redirect or another 4xx, nor on an address
    the policy refuses. Each attempt has its own timeout, `FACTORY_CALLBACK_TIMEOUT_S` cut to what is left.

    Args:
        url: the job's `callback_url`.
        body: the exact bytes sent and signed.
        secret: signs each attempt (a fresh timestamp each); None sends it unsigned.
        delivery_id: the same on every attempt (`X-Factory-Delivery`), so a receiver can drop duplicates.
        on_attempt: awaited after each attempt, with it (the event log's record).

    Returns:
        The Delivery, every attempt in it. Never raises for the receiver's or the network's faults.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.callback_retry_window_s
    try:
        target = parse_callback_url(url)
    except CallbackRefused as exc:
        delivery = Delivery(url="(refused)", signed=secret is not None)
        await _note(delivery, Attempt(1, delivery.url, delivery.signed, error=str(exc), final=True), on_attempt)
        return delivery
    delivery = Delivery(url=target.shown, signed=secret is not None)
    allow = AllowList.parse(settings.callback_allowed_hosts)
    async with httpx.AsyncClient(trust_env=False, verify=httpx.create_ssl_context(trust_env=True),
                                 follow_redirects=False) as client:
        for number in itertools.count(1):
            attempt = Attempt(number, target.shown, secret is not None)
            started = time.monotonic()
            retry_after_s = None
            try:
                limit = min(settings.callback_timeout_s, deadline - loop.time())
                attempt.address, attempt.status_code = await asyncio.wait_for(
                    _attempt(client, target, allow, body, secret, delivery_id, number, limit), limit)
            except CallbackRefused as exc:
                attempt.error = str(exc)
            except _Answer as exc:
                attempt.status_code, attempt.error, attempt.retry = exc.status_code, str(exc), exc.retry
                retry_after_s = exc.retry_after_s
            except (httpx.TransportError, CallbackUnresolved, TimeoutError, OSError) as exc:
                attempt.error, attempt.retry = _describe(exc, limit), True
            attempt.duration_ms = int((time.monotonic() - started) * 1000)
            wait = _backoff(settings.retry_delay_s, number, retry_after_s)
            if attempt.retry and deadline - (loop.time() + wait) < MIN_ATTEMPT_S:
                attempt.retry = False
                attempt.error = (f"{attempt.error}; given up: no time is left in the "
                                 f"{settings.callback_retry_window_s:g} s retry window for another attempt")
            attempt.final = not attempt.retry
            await _note(delivery, attempt, on_attempt)
            if attempt.final:
                break
            await asyncio.sleep(wait)
    return delivery


async def _attempt(client: httpx.AsyncClient, target: CallbackTarget, allow: AllowList, body: bytes,
                   secret: SecretStr | None, delivery_id: str, number: int, timeout_s: float) -> tuple[str, int]:
    """Resolve and check, then POST to the first checked address that accepts a connection."""
    addresses = await check_destination(target, allow)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Host": target.host_header,
               DELIVERY_HEADER: delivery_id, "X-Factory-Attempt": str(number)}
    if secret is not None:
        headers[SIGNATURE_HEADER] = signature(secret.get_secret_value(), body, int(time.time()))
    last: Exception | None = None
    for address in addresses:
        try:
            status = await _post(client, target, address, body, headers, timeout_s)
        except httpx.ConnectError as exc:  # this address refused or is unreachable: the next checked one
            last = exc
            continue
        if 200 <= status.status_code < 300:
            return str(address), status.status_code
        raise _answer(status)
    raise last or CallbackUnresolved(f"'{target.host}' resolves to no address")


async def _post(client: httpx.AsyncClient, target: CallbackTarget, address: IPAddress, body: bytes,
                headers: dict[str, str], timeout_s: float) -> httpx.Response:
    pinned = target.url.copy_with(host=str(address))
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    request = client.build_request("POST", pinned, content=body, headers=headers,
                                   timeout=httpx.Timeout(timeout_s), extensions=extensions)
    response = await client.send(request, stream=True)  # the receiver's body is never read: it may be endless
    await response.aclose()
    return response


def _answer(response: httpx.Response) -> _Answer:
    code = response.status_code
    if 300 <= code < 400:
        return _Answer(code, False, None, f"answered {code}: redirects are not followed; give the final URL")
    retry = code == 429 or code >= 500
    return _Answer(code, retry, _retry_after(response) if code in (429, 503) else None,
                   f"answered {code}" + ("" if retry else ": not retried (the receiver refused the request)"))


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None  # absent, or an HTTP date: the backoff decides


def _backoff(first_s: float, number: int, retry_after_s: float | None) -> float:
    backoff = min(MAX_BACKOFF_S, first_s * 2 ** (number - 1)) * random.uniform(0.5, 1.0)
    return float(max(backoff, retry_after_s or 0.0))


def _describe(exc: BaseException, limit: float) -> str:
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return f"no answer within {limit:.1f} s"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _note(delivery: Delivery, attempt: Attempt,
                on_attempt: Callable[[Attempt], Awaitable[None]] | None) -> None:
    delivery.attempts.append(attempt)
    if on_attempt is not None:
        await on_attempt(attempt)
