"""The job's callback, as a domain: where a `callback_url` may lead, how its body is signed, and what it says.

A `callback_url` is a parameter anyone who can create a run sets, so the worker must not become a proxy into its
own network: `check_destination` resolves the host once and refuses it if any address it resolves to is loopback,
private, link-local (169.254.169.254, the cloud metadata service, included), unspecified, multicast, reserved,
shared (CGNAT, 100.64/10) or otherwise not globally routable, IPv4 inside IPv6 (mapped, NAT64, 6to4) judged as
the IPv4 it carries, unless the operator lists the host in `FACTORY_CALLBACK_ALLOWED_HOSTS`. The sender
(tasks/callback.py) connects to the addresses this returned, never to a second resolution of the name.

Example::

    target = parse_callback_url("https://hooks.example.com/factory")
    addresses = await check_destination(target, AllowList.parse(settings.callback_allowed_hosts))
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import httpx
from pydantic import ValidationError

from factory.errors import ConfigurationError, FactoryError
from factory.models import MAX_CALLBACK_URL_CHARS, Event, IterationDetail, JobResult, StopReason
from factory.settings import FactorySettings

FIELD = "callback_url"
SIGNATURE_HEADER = "X-Factory-Signature"
DELIVERY_HEADER = "X-Factory-Delivery"
SHARED_ADDRESS_SPACE = ip_network("100.64.0.0/10")  # RFC 6598 (CGNAT): neither private nor public to ipaddress
NAT64_PREFIX = ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address reached
METADATA_ADDRESSES = {ip_address("169.254.169.254"), ip_address("fd00:ec2::254")}

IPAddress = IPv4Address | IPv6Address


class CallbackRefused(ConfigurationError):
    """The `callback_url` may not be called: its form, or an address its host resolves to."""

    def __init__(self, message: str) -> None:
        super().__init__(FIELD, message)


class CallbackUnresolved(FactoryError):
    """The callback's host name did not resolve (now): worth another try."""


@dataclass(frozen=True)
class CallbackTarget:
    """A parsed `callback_url`: the URL (without its fragment), and the host and port it connects to."""

    url: httpx.URL
    host: str  # as DNS and the allow list see it: lowercase, IDNA-encoded, IPv6 without brackets
    port: int

    @property
    def host_header(self) -> str:
        """What the request's `Host` says: the name the URL gave (with its port unless the default one)."""
        return self.url.netloc.decode("ascii")

    @property
    def shown(self) -> str:
        """The URL for logs and the UI: a query string often carries a token, so it is not shown."""
        return f"{self.url.scheme}://{self.host_header}{self.url.path}" + ("?..." if self.url.query else "")


def parse_callback_url(url: Any) -> CallbackTarget:
    """The target of a `callback_url`: http or https, a host, no userinfo, nothing unprintable.

    Raises:
        CallbackRefused: naming what is wrong.

    Example:
        >>> parse_callback_url("https://Hooks.Example.com:8443/f?token=x").shown
        'https://hooks.example.com:8443/f?...'
    """
    if not isinstance(url, str) or not url or len(url) > MAX_CALLBACK_URL_CHARS:
        raise CallbackRefused(f"give an http:// or https:// URL of at most {MAX_CALLBACK_URL_CHARS} characters.")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise CallbackRefused("the URL holds whitespace or a control character; percent-encode it.")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise CallbackRefused(f"not a URL ({exc}).") from exc
    if parsed.scheme not in ("http", "https"):
        raise CallbackRefused(f"the scheme must be http or https, not '{parsed.scheme}'.")
    if parsed.userinfo:
        raise CallbackRefused("the URL may not carry a user or password; the body is signed instead (see README).")
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    if not host:
        raise CallbackRefused("the URL names no host.")
    return CallbackTarget(url=parsed.copy_with(fragment=None), host=host,
                          port=parsed.port or (443 if parsed.scheme == "https" else 80))


@dataclass(frozen=True)
class AllowList:
    """The operator's `FACTORY_CALLBACK_ALLOWED_HOSTS`: host names (matched as the URL gives them), IPs and
    CIDR networks (matched against every address a host resolves to)."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPv4Network | IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """The allow list from its comma-separated form: IPs and CIDR networks become networks, the rest host names."""
        names, networks = set(), []
        for entry in (e.strip().lower().strip("[]").rstrip(".") for e in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ip_network(entry, strict=False))
            except ValueError:
                names.add(entry)
        return cls(frozenset(names), tuple(networks))

    def covers(self, address: IPAddress) -> bool:
        """Whether a listed network holds `address` (an IPv4-mapped IPv6 address is judged as its IPv4 address)."""
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # the IPv4 address it is, for an IPv4 entry
        return any(address.version == network.version and address in network for network in self.networks)


def address_refusal(address: IPAddress) -> str | None:
    """Why a callback may not connect to `address`, or None for a public unicast address.

    Example:
        >>> address_refusal(ip_address("169.254.169.254"))
        'a link-local address (the cloud metadata service)'
        >>> address_refusal(ip_address("::ffff:10.0.0.1"))
        'an IPv4-mapped form of 10.0.0.1, a private address'
        >>> address_refusal(ip_address("93.184.215.14")) is None
        True
    """
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket
            return _embedded("an IPv4-mapped form", address.ipv4_mapped)
        if address in NAT64_PREFIX:  # a NAT64 gateway forwards it to the IPv4 address it ends with
            return _embedded("a NAT64 form", IPv4Address(int(address) & 0xFFFF_FFFF))
        if address.sixtofour is not None and (why := address_refusal(address.sixtofour)) is not None:
            return f"a 6to4 address of {address.sixtofour}, {why}"
        if address.is_site_local:  # deprecated fec0::/10, which ipaddress still counts as global
            return "a site-local address"
    checks = [
        (address.is_unspecified, "an unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"
         + (" (the cloud metadata service)" if address in METADATA_ADDRESSES else "")),
        (address.is_multicast, "a multicast address"),
        (address.version == 4 and address in SHARED_ADDRESS_SPACE, "a shared (CGNAT) address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a globally routable address"),
    ]
    return next((why for hit, why in checks if hit), None)


def _embedded(how: str, address: IPv4Address) -> str | None:
    why = address_refusal(address)
    return f"{how} of {address}, {why}" if why else None


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order; an IP literal is itself (no DNS).

    Raises:
        CallbackUnresolved: the name did not resolve.
    """
    try:
        return [ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise CallbackUnresolved(f"'{host}' does not resolve ({exc})") from exc
    found = [ip_address(info[4][0]) for info in infos]
    return list(dict.fromkeys(found))


async def check_destination(target: CallbackTarget, allow: AllowList) -> list[IPAddress]:
    """Resolve the target's host once and check every address; returns the addresses to connect to.

    Raises:
        CallbackRefused: an address is not public and the operator did not allow it.
        CallbackUnresolved: the name did not resolve.
    """
    addresses = await resolve(target.host, target.port)
    if not addresses:
        raise CallbackUnresolved(f"'{target.host}' resolves to no address")
    if target.host in allow.names:
        return addresses
    for address in addresses:
        if not allow.covers(address) and (why := address_refusal(address)) is not None:
            seen = f"'{target.host}' is {why}" if str(address) == target.host else \
                f"'{target.host}' resolves to {address}, {why}"
            raise CallbackRefused(f"{seen}: callbacks go to public addresses only. The operator can allow this "
                                  f"host with FACTORY_CALLBACK_ALLOWED_HOSTS where the worker runs.")
    return addresses


async def check_callback_url(url: str, settings: FactorySettings) -> list[str]:
    """The check when a run starts, before anything is spent; returns warnings for the run's log.

    Raises:
        CallbackRefused: the URL is malformed or leads somewhere the worker may not call.
    """
    target = parse_callback_url(url)
    try:
        await asyncio.wait_for(check_destination(target, AllowList.parse(settings.callback_allowed_hosts)),
                               settings.callback_timeout_s)
    except (CallbackUnresolved, TimeoutError) as exc:  # DNS can be down for a moment: checked again at the end
        return [f"`{FIELD}`: {exc or 'the host did not resolve in time'}; it is resolved and checked again when "
                f"the job ends."]
    return []


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Factory-Signature` value: `t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.

    Example:
        >>> signature("s3cret", b"{}", 1700000000)
        't=1700000000,v1=97926816e98fbb41ccb1673225ff29a2f35369099990e1b1561651e7bd097ebf'
    """
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


# --- what the callback says -------------------------------------------------------------------------------


def run_events(events: list[dict[str, Any]], flow_run_id: Any) -> list[dict[str, Any]]:
    """The events one flow run of the job wrote, from its JOB_CREATED on; [] if it never opened the log."""
    for index in range(len(events) - 1, -1, -1):
        event = events[index]
        if event.get("event") == Event.JOB_CREATED and event.get("data", {}).get("flow_run_id") == str(flow_run_id):
            return events[index:]
    return []


def reported(events: list[dict[str, Any]], flow_run_id: Any) -> bool:
    """Whether this flow run's callback was already delivered or given up: a hook that runs twice sends once."""
    return any(event.get("event") == Event.CALLBACK_SENT
               or (event.get("event") == Event.CALLBACK_FAILED and event.get("data", {}).get("final"))
               for event in events if event.get("data", {}).get("flow_run_id") == str(flow_run_id))


def stored_result(data: bytes, run: list[dict[str, Any]]) -> JobResult | None:
    """The JobResult written beside the log, if this flow run wrote it: one that started before this run's
    JOB_CREATED is an earlier run's, of the same job_id."""
    if not run:
        return None
    try:
        result = JobResult.model_validate_json(data)
    except ValidationError:
        return None
    created = datetime.fromisoformat(run[0]["timestamp"])
    return result if result.started_at is not None and result.started_at >= created else None


def result_from_log(job_id: str, stop: StopReason, run: list[dict[str, Any]], note: str, *, created_at: datetime,
                    completed_at: datetime, executor_model: str, evaluator_model: str,
                    log_ref: str | None) -> JobResult:
    """A JobResult for a run that ended without writing its own (killed, cancelled by its worker, refused):
    its iterations and spend as far as its event log recorded them; `error` says so."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in run:
        by_name.setdefault(str(event.get("event")), []).append(event)
    started = next(iter(by_name.get(Event.JOB_STARTED, [])), None)
    if started is not None:
        executor_model = started["data"].get("executor_model", executor_model)
        evaluator_model = started["data"].get("evaluator_model", evaluator_model)
    details, functional = _iterations(by_name)
    spent = max((float(e["data"].get("spent_usd", 0.0)) for e in by_name.get(Event.ITERATION_START, [])
                 + by_name.get(Event.ITERATION_END, [])), default=0.0)
    spent = max(spent, sum(d.cost_usd for d in details))
    best = max(details, key=lambda d: (d.converged, d.confidence, d.iteration), default=None)
    started_at = datetime.fromisoformat(started["timestamp"]) if started else None
    if run:
        created_at = datetime.fromisoformat(run[0]["timestamp"])
    note = note.rstrip(".") + (". The job ended before writing its JobResult: this one is rebuilt from its event log, "
                               "and total_cost_usd is what the log recorded (a lower bound)." if run else ".")
    return JobResult(
        job_id=job_id, status=stop.status, stop_reason=stop, converged=False,
        final_artifact_ref=best.artifact_ref if best else None,
        last_functional_iteration=functional[-1] if functional else None,
        total_iterations=len(details), total_cost_usd=spent,
        other_cost_usd=max(0.0, spent - sum(d.cost_usd for d in details)),
        total_duration_ms=int((completed_at - started_at).total_seconds() * 1000) if started_at else 0,
        created_at=created_at, started_at=started_at, completed_at=completed_at,
        executor_model_used=executor_model, evaluator_model_used=evaluator_model, iterations_detail=details,
        log_ref=log_ref if run else None, error=note, dry_run="dry-run" in (executor_model, evaluator_model),
    )


def _iterations(by_name: dict[str, list[dict[str, Any]]]) -> tuple[list[IterationDetail], list[int]]:
    outputs = {e["data"].get("iteration"): e["data"] for e in by_name.get(Event.EXECUTOR_RESPONSE, [])}
    verdicts = {e["data"].get("iteration"): e["data"] for e in by_name.get(Event.EVALUATOR_RESPONSE, [])}
    details, functional = [], []
    for end in (e["data"] for e in by_name.get(Event.ITERATION_END, [])):
        n = end.get("iteration")
        try:
            details.append(IterationDetail(
                iteration=n, duration_ms=end["duration_ms"], converged=end["converged"],
                confidence=end["confidence"], cost_usd=end["cost_usd"], artifact_ref=outputs[n]["artifact_ref"],
                usage_known=end.get("usage_known", True)))
        except (KeyError, ValidationError):
            continue  # an event this code did not write: left out rather than guessed
        verdict = verdicts.get(n, {})
        if n in verdicts and not verdict.get("weaknesses") and not verdict.get("parse_error"):
            functional.append(n)
    return details, functional
