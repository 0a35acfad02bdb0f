"""`callback_url`: one signed POST of the JobResult when a job ends, retried for a bounded time, and never a way
into the worker's own network. Receivers run on 127.0.0.1 only; other addresses are checked without a connection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

import pytest
import uvicorn
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import factory.callback as callback
from factory.callback import (
    AllowList,
    CallbackRefused,
    address_refusal,
    check_destination,
    parse_callback_url,
    result_from_log,
    stored_result,
)
from factory.eventlog import EventLog
from factory.models import Event, JobResult, JobStatus, StopReason
from factory.settings import get_settings
from factory.storage import get_storage
from flows.hooks import record_failure
from tasks.callback import send_callback
from tests.conftest import reset_settings
from tests.emulators.llm import Script
from tests.emulators.server import ThreadedServer, free_port
from tests.helpers import DONE, NOT_YET, artifacts_of, event_names, job_params, read_log, run_job
from tests.processes import deployment_run, run_cli, served_deployment, wait_state
from tests.test_params import deployment  # noqa: F401 - the fixture

SECRET = "whsec-test-callback-secret"
README = Path(__file__).resolve().parent.parent / "README.md"
PUBLIC = ip_address("93.184.215.14")


def readme_verifier():
    """`verify_signature` exactly as the README's *Callbacks* section shows it."""
    section = README.read_text().split("## Callbacks", 1)[1].split("\n## ", 1)[0]
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)  # noqa: S102 - our own README
    return namespace["verify_signature"]


verify_signature = readme_verifier()


@dataclass
class Receiver:
    """A callback receiver: answers each POST as scripted (status codes, or "hang" until released)."""

    answers: list = field(default_factory=lambda: [200])
    requests: list[dict] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    async def receive(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append({"headers": dict(request.headers), "body": body, "path": request.url.path})
        answer = self.answers[min(len(self.requests) - 1, len(self.answers) - 1)]
        while answer == "hang" and not self.released.is_set():
            await asyncio.sleep(0.05)
        return Response(status_code=200 if answer == "hang" else answer)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.receive, methods=["POST"])])

    def bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]


@pytest.fixture
def receiver():
    found = Receiver()
    server = ThreadedServer(found.app).start()
    found.url = f"{server.url}/hooks/factory?token=t0k3n"
    yield found
    found.released.set()
    server.stop()


@pytest.fixture
def allowed(factory_env, monkeypatch):
    """Loopback allowed as the operator would (FACTORY_CALLBACK_ALLOWED_HOSTS), a secret, a short window."""
    monkeypatch.setenv("FACTORY_CALLBACK_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("FACTORY_CALLBACK_SECRET", SECRET)
    monkeypatch.setenv("FACTORY_CALLBACK_RETRY_WINDOW_S", "10")
    reset_settings()
    yield factory_env
    reset_settings()


def assert_signed(request: dict) -> None:
    header = request["headers"]["x-factory-signature"]
    assert verify_signature(SECRET, header, request["body"])
    assert not verify_signature("another-secret", header, request["body"])
    assert not verify_signature(SECRET, header, request["body"] + b" ")


def callback_events(log_ref: str) -> list[dict]:
    return [e for e in read_log(log_ref) if e["event"].startswith("CALLBACK_")]


# --- a finished job sends one signed callback -------------------------------------------------------------------

ENDINGS = [
    ("converged", Script(verdicts=[NOT_YET, DONE]), {}, JobStatus.CONVERGED, StopReason.CONFORMITY),
    ("exhausted", Script(verdicts=[NOT_YET]), {"limits": {"max_cycles": 2}}, JobStatus.EXHAUSTED,
     StopReason.MAX_CYCLES),
    ("failed", Script(faults=[None, "401"]), {}, JobStatus.FAILED, StopReason.ERROR),
]


@pytest.mark.parametrize("script, overrides, status, stop", [e[1:] for e in ENDINGS], ids=[e[0] for e in ENDINGS])
async def test_a_finished_job_sends_one_signed_callback(allowed, receiver, script, overrides, status, stop):
    allowed.reset(script)
    state = await run_job(callback_url=receiver.url, **overrides)
    assert len(receiver.requests) == 1, "exactly one callback per finished job"
    request = receiver.requests[0]
    assert_signed(request)
    body = JobResult.model_validate_json(request["body"])
    assert body.status is status and body.stop_reason is stop
    stored = JobResult.model_validate_json(Path(body.log_ref).with_name("result.json").read_bytes())
    assert body == stored, "the callback carries the JobResult the job wrote"
    if state.is_completed():
        assert body == await state.result()
    else:
        assert "API key was refused" in body.error
    assert request["headers"]["x-factory-delivery"] == str(state.state_details.flow_run_id)
    assert request["path"] == "/hooks/factory" and request["headers"]["content-type"] == "application/json"
    names = event_names(body.log_ref)
    assert names[-2:] == ["JOB_COMPLETED", "CALLBACK_SENT"]
    log = await EventLog.open(get_storage(), get_storage().resolve(body.log_ref, "log_ref"), body.job_id)
    assert log.completed, "callback events after JOB_COMPLETED leave the log complete"
    sent = callback_events(body.log_ref)[0]["data"]
    assert sent["status_code"] == 200 and sent["signed"] and sent["address"] == "127.0.0.1"
    assert "t0k3n" not in json.dumps(sent), "a token in the query string is not written to the log"
    artifacts = await artifacts_of(state.state_details.flow_run_id)
    shown = artifacts[f"factory-{body.job_id}-callback"][-1]
    assert "delivered" in shown.data and "t0k3n" not in shown.data


async def test_a_job_cancelled_in_its_process_sends_one_cancelled_callback(allowed, receiver):
    allowed.reset(Script(verdicts=[NOT_YET], latency_s=0.3))
    params = job_params(callback_url=receiver.url, limits={"max_cycles": 30})
    log_path = get_storage().root / params["job_id"] / "log.json"
    running = asyncio.create_task(run_job(**params))
    deadline = time.monotonic() + 60
    while not (log_path.exists() and "ITERATION_END" in event_names(log_path)):
        assert time.monotonic() < deadline and not running.done()
        await asyncio.sleep(0.1)
    running.cancel()
    done, _ = await asyncio.wait({running}, timeout=60)
    assert done, "the cancelled job must end within a bounded time"
    assert len(receiver.requests) == 1
    assert_signed(receiver.requests[0])
    body = receiver.bodies()[0]
    assert body["status"] == "CANCELLED" and body["stop_reason"] == "CANCELLED" and body["total_iterations"] >= 1
    assert event_names(log_path)[-1] == "CALLBACK_SENT"


async def test_a_job_refused_before_it_started_still_reports_its_failure(allowed, receiver):
    state = await run_job(callback_url=receiver.url, executor_model="claude-unpriced-9")
    assert state.is_failed() and allowed.requests == []
    [body] = receiver.bodies()
    assert body["status"] == "FAILED" and body["stop_reason"] == "ERROR" and body["total_cost_usd"] == 0
    assert "`executor_model`" in body["error"] and body["iterations_detail"] == []
    assert_signed(receiver.requests[0])


@pytest.mark.cli
def test_a_job_cancelled_through_prefect_sends_one_cancelled_callback(llm_server, receiver, tmp_path):
    """The real path: `prefect flow-run cancel`, the worker stops the flow's process and runs on_cancellation."""
    llm_server.reset(Script(verdicts=[NOT_YET], latency_s=1.0))
    params = {"seed": "Write an essay.", "objective": "An essay.", "job_id": "cli-callback-cancel",
              "limits": {"max_cycles": 30}, "callback_url": receiver.url}
    environment = {"FACTORY_CALLBACK_ALLOWED_HOSTS": "127.0.0.1", "FACTORY_CALLBACK_SECRET": SECRET}
    with served_deployment(tmp_path, environment) as served:
        flow_run_id = deployment_run(served["env"], params)
        log_path = served["storage"] / "cli-callback-cancel" / "log.json"
        deadline = time.monotonic() + 120
        while not (log_path.exists() and "ITERATION_END" in event_names(log_path)):
            assert time.monotonic() < deadline, served["worker"].log.read_text()[-3000:]
            time.sleep(0.5)
        cancel = run_cli(["flow-run", "cancel", flow_run_id], served["env"])
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        wait_state(served, flow_run_id, {"CANCELLED"}, timeout_s=90)
        deadline = time.monotonic() + 30
        while not receiver.requests:
            assert time.monotonic() < deadline, served["worker"].log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(2)  # a second callback would come now
    assert len(receiver.requests) == 1
    assert_signed(receiver.requests[0])
    body = receiver.bodies()[0]
    assert body["status"] == "CANCELLED" and body["stop_reason"] == "CANCELLED" and body["total_iterations"] >= 1
    assert event_names(log_path)[-2:] == ["JOB_COMPLETED", "CALLBACK_SENT"]


async def test_a_flaky_receiver_gets_it_on_the_third_attempt(allowed, receiver):
    receiver.answers = [500, 500, 200]
    state = await run_job(callback_url=receiver.url)
    result: JobResult = await state.result()
    assert len(receiver.requests) == 3
    for request in receiver.requests:
        assert_signed(request)
    assert len({r["headers"]["x-factory-delivery"] for r in receiver.requests}) == 1
    assert [r["headers"]["x-factory-attempt"] for r in receiver.requests] == ["1", "2", "3"]
    events = callback_events(result.log_ref)
    assert [e["event"] for e in events] == ["CALLBACK_FAILED", "CALLBACK_FAILED", "CALLBACK_SENT"]
    assert [e["data"]["status_code"] for e in events] == [500, 500, 200]
    assert events[0]["data"]["retry"] and not events[-1]["data"]["retry"] and events[-1]["data"]["final"]


async def test_a_refused_receiver_is_not_retried(allowed, receiver):
    receiver.answers = [404]
    result: JobResult = await (await run_job(callback_url=receiver.url)).result()
    assert len(receiver.requests) == 1
    [failed] = callback_events(result.log_ref)
    assert failed["event"] == "CALLBACK_FAILED" and failed["data"]["final"] and "not retried" in failed["data"]["error"]


async def test_a_hanging_receiver_never_holds_the_job_past_the_window(allowed, receiver, monkeypatch):
    monkeypatch.setenv("FACTORY_CALLBACK_RETRY_WINDOW_S", "1")
    reset_settings()
    receiver.answers = ["hang"]
    state = await asyncio.wait_for(run_job(callback_url=receiver.url), timeout=60)  # the receiver never answers
    assert state.is_completed()
    result: JobResult = await state.result()
    events = callback_events(result.log_ref)
    assert events and all(e["event"] == "CALLBACK_FAILED" for e in events)
    assert events[-1]["data"]["final"] and "retry window" in events[-1]["data"]["error"]
    assert "no answer within" in events[0]["data"]["error"]


async def test_an_unsigned_callback_is_said_in_the_run_log(factory_env, receiver, monkeypatch, caplog):
    monkeypatch.setenv("FACTORY_CALLBACK_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.delenv("FACTORY_CALLBACK_SECRET", raising=False)
    reset_settings()
    with caplog.at_level("WARNING"):
        result: JobResult = await (await run_job(callback_url=receiver.url)).result()
    assert "x-factory-signature" not in receiver.requests[0]["headers"]
    assert callback_events(result.log_ref)[0]["data"]["signed"] is False
    assert any("No callback secret" in r.getMessage() for r in caplog.records)


async def test_a_hook_that_runs_again_does_not_send_again(allowed, receiver):
    state = await run_job(callback_url=receiver.url)
    async with get_client() as client:
        flow_run = await client.read_flow_run(state.state_details.flow_run_id)
    await record_failure(None, flow_run, flow_run.state)
    assert len(receiver.requests) == 1


# --- where a callback may go --------------------------------------------------------------------------------------


async def test_a_loopback_callback_is_refused_before_any_call(factory_env, receiver):
    state = await run_job(callback_url=receiver.url)
    assert state.is_failed()
    assert "`callback_url`" in state.message and "'127.0.0.1' is a loopback address" in state.message
    assert factory_env.requests == [], "nothing may be spent on a refused job"
    assert receiver.requests == [], "nor may the refused address be called when the job ends"


async def test_a_name_that_rebinds_to_loopback_is_refused_when_the_callback_is_sent(factory_env, receiver,
                                                                                  monkeypatch):
    answers = iter([[PUBLIC]])

    async def rebinding(host, port):  # public when the run starts, loopback when the job ends
        return next(answers, [ip_address("127.0.0.1")])

    monkeypatch.setattr(callback, "resolve", rebinding)
    port = receiver.url.split(":")[2].split("/")[0]
    state = await run_job(callback_url=f"http://rebind.test:{port}/hooks/factory")
    assert state.is_completed()
    assert receiver.requests == []
    [failed] = callback_events((await state.result()).log_ref)
    assert failed["event"] == "CALLBACK_FAILED" and "resolves to 127.0.0.1, a loopback address" in \
        failed["data"]["error"]


REFUSED = [
    ("10.0.0.1", "a private address"),
    ("172.16.5.4", "a private address"),
    ("192.168.1.1", "a private address"),
    ("169.254.169.254", "a link-local address (the cloud metadata service)"),
    ("[fd00::1]", "a private address"),
    ("[fe80::1]", "a link-local address"),
    ("127.0.0.1", "a loopback address"),
    ("[::1]", "a loopback address"),
    ("0.0.0.0", "an unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("240.0.0.1", "a private address"),
    ("100.64.0.1", "a shared (CGNAT) address"),
    ("[::ffff:10.0.0.1]", "an IPv4-mapped form of 10.0.0.1, a private address"),
    ("[::ffff:169.254.169.254]", "an IPv4-mapped form of 169.254.169.254, a link-local address"),
    ("[64:ff9b::7f00:1]", "a NAT64 form of 127.0.0.1, a loopback address"),
    ("[2002:a00:1::]", "a 6to4 address of 10.0.0.1, a private address"),
]


@pytest.mark.fast
@pytest.mark.parametrize("host, why", REFUSED, ids=[h for h, _ in REFUSED])
async def test_addresses_that_are_not_public_are_refused(host, why, monkeypatch):
    async def no_dns(name, port):
        raise AssertionError("an IP literal needs no look-up")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_dns)
    with pytest.raises(CallbackRefused, match=re.escape(why)) as refused:
        await check_destination(parse_callback_url(f"http://{host}:8080/hook"), AllowList())
    assert refused.value.field == "callback_url" and str(refused.value).startswith("`callback_url`")


@pytest.mark.fast
async def test_a_name_resolving_to_a_private_address_is_refused(monkeypatch):
    async def resolver(host, port):
        return {"hooks.example.com": [PUBLIC], "internal.example.com": [PUBLIC, ip_address("10.1.2.3")],
                "metadata.example.com": [ip_address("169.254.169.254")]}[host]

    monkeypatch.setattr(callback, "resolve", resolver)
    allow = AllowList()
    assert await check_destination(parse_callback_url("https://hooks.example.com/x"), allow) == [PUBLIC]
    with pytest.raises(CallbackRefused, match=r"'internal.example.com' resolves to 10.1.2.3, a private address"):
        await check_destination(parse_callback_url("https://internal.example.com/x"), allow)
    with pytest.raises(CallbackRefused, match="cloud metadata"):
        await check_destination(parse_callback_url("http://metadata.example.com/latest"), allow)
    by_name = AllowList.parse("Internal.Example.com.")
    assert await check_destination(parse_callback_url("https://internal.example.com/x"), by_name)
    by_network = AllowList.parse(" 10.0.0.0/8 , other.host")
    assert await check_destination(parse_callback_url("https://internal.example.com/x"), by_network)
    with pytest.raises(CallbackRefused):
        await check_destination(parse_callback_url("http://metadata.example.com/"), by_network)


@pytest.mark.fast
def test_public_addresses_pass_the_address_check():
    for address in ("93.184.215.14", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert address_refusal(ip_address(address)) is None, address


@pytest.mark.fast
@pytest.mark.parametrize("url, message", [
    ("ftp://x/", "scheme must be http or https"),
    ("http://user:pass@host/", "user or password"),
    ("http:///path", "names no host"),
    ("http://host/a b", "whitespace"),
    ("https://x/" + "a" * 3000, "at most 2048"),
])
def test_malformed_urls_are_refused_naming_the_field(url, message):
    with pytest.raises(CallbackRefused, match=message):
        parse_callback_url(url)


BAD_URLS = [("ftp", "ftp://x"), ("userinfo", "http://user:pass@host/"), ("too-long", "https://x/" + "a" * 3000),
            ("no-host", "https:///x")]


@pytest.mark.parametrize("url", [u for _, u in BAD_URLS], ids=[i for i, _ in BAD_URLS])
async def test_deployment_refuses_bad_callback_urls_at_creation(deployment, url):  # noqa: F811
    with pytest.raises(PrefectHTTPStatusError) as caught:
        await run_deployment(deployment, parameters=job_params(callback_url=url), timeout=0)
    assert caught.value.response.status_code == 409
    assert "field 'callback_url'" in caught.value.response.json()["detail"]


# --- the connection goes to the checked address -------------------------------------------------------------------


async def test_the_request_goes_to_the_checked_address_with_the_name_as_host(receiver, monkeypatch):
    async def resolver(host, port):
        assert host == "callback.test"
        return [ip_address("127.0.0.1")]

    monkeypatch.setattr(callback, "resolve", resolver)
    settings = get_settings().model_copy(update={"callback_allowed_hosts": "127.0.0.1"})
    port = receiver.url.split(":")[2].split("/")[0]
    delivery = await send_callback(f"http://callback.test:{port}/in", b"{}", None, settings=settings,
                                   delivery_id="d-1")
    assert delivery.delivered and delivery.attempts[0].address == "127.0.0.1"
    assert receiver.requests[0]["headers"]["host"] == f"callback.test:{port}"


def _certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` only (no IP): it verifies only against the name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.mark.parametrize("served_name, delivered", [("callback.test", True), ("other.test", False)])
async def test_https_checks_the_certificate_against_the_name_not_the_address(tmp_path, monkeypatch, served_name,
                                                                            delivered):
    cert_file, key_file = _certificate(tmp_path, served_name)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # the receiver's certificate is the only one trusted
    found = Receiver()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(found.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            await asyncio.sleep(0.02)

        async def resolver(host, port):
            return [ip_address("127.0.0.1")]

        monkeypatch.setattr(callback, "resolve", resolver)
        settings = get_settings().model_copy(update={"callback_allowed_hosts": "callback.test",
                                                     "callback_retry_window_s": 0.5})
        delivery = await asyncio.wait_for(send_callback(f"https://callback.test:{port}/in", b"{}", None,
                                                        settings=settings, delivery_id="d-2"), 30)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert delivery.delivered is delivered
    if delivered:
        assert found.requests[0]["headers"]["host"] == f"callback.test:{port}"
    else:
        assert found.requests == [] and "CERTIFICATE_VERIFY_FAILED" in delivery.attempts[0].error


@pytest.mark.fast
async def test_a_url_the_hook_cannot_use_is_recorded_not_sent():
    attempts = []

    async def record(attempt):
        attempts.append(attempt)

    delivery = await send_callback("http://user:pw@127.0.0.1:9/", b"{}", None, settings=get_settings(),
                                   delivery_id="d-4", on_attempt=record)
    assert not delivery.delivered and attempts == delivery.attempts and attempts[0].final
    assert "user or password" in attempts[0].error and attempts[0].address is None


async def test_a_hanging_receiver_is_given_up_within_the_window(receiver):
    receiver.answers = ["hang"]
    settings = get_settings().model_copy(update={"callback_allowed_hosts": "127.0.0.1",
                                                 "callback_retry_window_s": 0.5})
    delivery = await asyncio.wait_for(send_callback(receiver.url, b"{}", None, settings=settings,
                                                    delivery_id="d-3"), timeout=10)
    assert not delivery.delivered and delivery.attempts[-1].final


# --- what a callback says when the job could not ------------------------------------------------------------------


def _event(name: str, at: str, **data) -> dict:
    return {"timestamp": f"2026-12-01T10:00:{at}+00:00", "event": name, "data": data}


RUN = [
    _event("JOB_CREATED", "00", job_id="j", flow_run_id="run-2"),
    _event("JOB_STARTED", "01", executor_model="claude-sonnet-5-5", evaluator_model="gpt-5.4"),
    _event("ITERATION_START", "02", iteration=1, spent_usd=0.0),
    _event("EXECUTOR_RESPONSE", "03", iteration=1, artifact_ref="/s/j/artifacts/iteration-01.md"),
    _event("EVALUATOR_RESPONSE", "04", iteration=1, converged=False, confidence=0.6, weaknesses=[]),
    _event("ITERATION_END", "05", iteration=1, converged=False, confidence=0.6, cost_usd=0.02, spent_usd=0.02,
           duration_ms=3000, usage_known=True),
    _event("ITERATION_START", "06", iteration=2, spent_usd=0.02),
    _event("JOB_COMPLETED", "09", status="CANCELLED", stop_reason="CANCELLED"),
]


@pytest.mark.fast
def test_a_result_rebuilt_from_the_log_says_what_the_log_knows():
    earlier = [_event("JOB_CREATED", "00", flow_run_id="run-1"), _event("JOB_COMPLETED", "00")]
    run = callback.run_events(earlier + RUN, "run-2")
    assert run == RUN and callback.run_events(earlier + RUN, "run-3") == []
    now = dt.datetime(2026, 12, 1, 10, 0, 10, tzinfo=dt.UTC)
    result = result_from_log("j", StopReason.CANCELLED, run, "cancelled through Prefect", created_at=now,
                             completed_at=now, executor_model="", evaluator_model="", log_ref="/s/j/log.json")
    assert result.status is JobStatus.CANCELLED and result.total_iterations == 1
    assert result.final_artifact_ref == "/s/j/artifacts/iteration-01.md" and result.last_functional_iteration == 1
    assert result.total_cost_usd == 0.02 and result.executor_model_used == "claude-sonnet-5-5"
    assert result.total_duration_ms == 9000 and "a lower bound" in result.error
    refused = result_from_log("j", StopReason.ERROR, [], "`executor_model`: no price", created_at=now,
                              completed_at=now, executor_model="x", evaluator_model="y", log_ref=None)
    assert refused.status is JobStatus.FAILED and refused.total_cost_usd == 0 and refused.error.startswith("`exec")


@pytest.mark.fast
def test_an_earlier_runs_result_is_not_taken_for_this_runs():
    now = dt.datetime(2026, 12, 1, 10, 0, 10, tzinfo=dt.UTC)
    result = result_from_log("j", StopReason.CANCELLED, RUN, "x", created_at=now, completed_at=now,
                             executor_model="", evaluator_model="", log_ref=None)
    data = result.model_dump_json().encode()
    assert stored_result(data, RUN) == result
    later = [{**RUN[0], "timestamp": "2026-12-01T11:00:00+00:00"}]
    assert stored_result(data, later) is None, "a result that started before this run's JOB_CREATED is older"
    assert stored_result(data, []) is None and stored_result(b"not json", RUN) is None


@pytest.mark.fast
def test_readme_snippet_rejects_stale_and_malformed_signatures():
    body = b'{"status": "CONVERGED"}'
    stale = int(time.time()) - 3600
    digest = hmac.new(SECRET.encode(), f"{stale}.".encode() + body, hashlib.sha256).hexdigest()
    assert not verify_signature(SECRET, f"t={stale},v1={digest}", body)
    assert verify_signature(SECRET, callback.signature(SECRET, body, int(time.time())), body)
    for header in ("", "t=abc,v1=00", "v1=00", "garbage", "t=1,v1=\u00e9"):
        assert not verify_signature(SECRET, header, body)


@pytest.mark.fast
def test_callback_events_after_completion_keep_the_log_complete():
    log = EventLog(get_storage(), get_storage().resolve("j/log.json", "log_ref"), "j")
    log.events = [{"event": Event.JOB_COMPLETED.value}, {"event": Event.CALLBACK_FAILED.value},
                  {"event": Event.CALLBACK_SENT.value}]
    assert log.completed
    log.events = [{"event": Event.CALLBACK_SENT.value}]
    assert not log.completed
