"""Artifacts, logs, inputs and results in a real S3-compatible server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

from blocks.register import RESULTS_BLOCK, RESULTS_FOLDER, register
from factory.errors import StorageError, StorageSpooled
from factory.models import JobResult, StopReason
from factory.s3 import ATTEMPT_TIMEOUT_S, S3Store
from factory.storage import get_storage
from tests.conftest import reset_settings
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, run_job
from tests.s3server import BUCKET


@pytest.fixture
async def s3_env(factory_env, s3_server, monkeypatch):
    monkeypatch.setenv("FACTORY_STORAGE_RETRY_WINDOW_S", "2")
    reset_settings()
    saved = await register()
    assert {"factory-aws", "factory-s3", RESULTS_BLOCK} <= set(saved)
    yield factory_env, s3_server
    if s3_server._server is None:
        s3_server.start()
    reset_settings()


def s3_object(server, key: str) -> tuple[bytes, str]:
    obj = server.client().get_object(Bucket=BUCKET, Key=key)
    return obj["Body"].read(), obj["ContentType"]


def events(server, key: str) -> list[str]:
    return [e["event"] for e in json.loads(s3_object(server, key)[0])["events"]]


async def test_artifacts_and_log_land_in_s3_with_content_types(s3_env):
    llm, s3 = s3_env
    llm.reset(Script(verdicts=[NOT_YET, DONE]))
    prefix = f"s3://{BUCKET}/jobs/s3-1"
    run = await run_job(job_id="s3-1", output_ref=f"{prefix}/", log_ref=f"{prefix}/log.json")
    result: JobResult = await run.result()
    assert result.stop_reason is StopReason.CONFORMITY
    assert result.final_artifact_ref == f"{prefix}/iteration-02.md"
    body, kind = s3_object(s3, "jobs/s3-1/iteration-01.md")
    assert body == b"Draft 1: an artifact." and kind.startswith("text/markdown")
    log, kind = s3_object(s3, "jobs/s3-1/log.json")
    assert kind == "application/json"
    assert events(s3, "jobs/s3-1/log.json")[-1] == "JOB_COMPLETED"


async def test_code_and_final_file_ref(s3_env):
    llm, s3 = s3_env
    llm.reset(Script(executor=["Here you go:\n```python\nprint('hi')\n```\nEnjoy."], verdicts=[DONE]))
    result: JobResult = await (await run_job(job_id="s3-code", function="CODE_GENERATION",
                                             output_ref=f"s3://{BUCKET}/code/hello.py")).result()
    assert result.final_artifact_ref == f"s3://{BUCKET}/code/hello-iterations/iteration-01.py"
    body, kind = s3_object(s3, "code/hello.py")
    assert body == b"print('hi')\n" and kind.startswith("text/x-python")


async def test_s3_input_ref_reaches_the_executor_and_a_missing_one_costs_nothing(s3_env):
    llm, s3 = s3_env
    s3.client().put_object(Bucket=BUCKET, Key="inputs/brief.txt", Body=b"The river is called Lethe.")
    llm.reset(Script(verdicts=[DONE]))
    state = await run_job(input_refs=[f"s3://{BUCKET}/inputs/brief.txt"])
    assert state.is_completed()
    assert "The river is called Lethe." in llm.requests[0]["body"]["messages"][0]["content"]

    llm.reset()
    state = await run_job(input_refs=[f"s3://{BUCKET}/inputs/missing.txt"])
    assert state.is_failed() and "`input_refs[0]`" in state.message and "missing.txt" in state.message
    assert llm.requests == []


async def test_s3_down_for_a_few_seconds_is_survived(s3_env, monkeypatch):
    llm, s3 = s3_env
    monkeypatch.setenv("FACTORY_STORAGE_RETRY_WINDOW_S", "20")
    reset_settings()

    def outage(index: int) -> None:
        if index == 0:
            s3.stop()
            threading.Timer(3.0, s3.start).start()

    llm.reset(Script(verdicts=[DONE], on_request=outage))
    started = time.monotonic()
    result: JobResult = await (await run_job(job_id="s3-outage", output_ref=f"s3://{BUCKET}/outage/")).result()
    assert result.stop_reason is StopReason.CONFORMITY
    assert time.monotonic() - started >= 2.5, "the outage should have been waited out"
    assert s3_object(s3, "outage/iteration-01.md")[0] == b"Draft 1: an artifact."


async def test_s3_down_for_good_spools_and_a_rerun_uploads_without_model_calls(s3_env, storage_root):
    llm, s3 = s3_env
    prefix = f"s3://{BUCKET}/spool-job"

    def outage(index: int) -> None:
        if index == 3:  # the last evaluator call: everything after it must be stored somewhere
            s3.stop()

    llm.reset(Script(verdicts=[NOT_YET, DONE], on_request=outage))
    params = {"job_id": "spool-1", "output_ref": f"{prefix}/", "log_ref": f"{prefix}/log.json"}
    failed = await run_job(**params)
    assert failed.is_failed()
    spool = storage_root / ".spool" / BUCKET / "spool-job"
    assert str(storage_root / ".spool") in failed.message and "Re-run the job" in failed.message
    assert (spool / "log.json").exists()
    assert json.loads((spool / "log.json").read_text())["events"][-1]["event"] == "JOB_COMPLETED"
    calls = len(llm.requests)

    s3.start()
    result: JobResult = await (await run_job(**params)).result()
    assert len(llm.requests) == calls, "the re-run must not pay for anything again"
    assert result.stop_reason is StopReason.CONFORMITY
    assert not any(p.is_file() for p in (storage_root / ".spool").rglob("*"))
    assert events(s3, "spool-job/log.json")[-1] == "JOB_COMPLETED"
    assert s3_object(s3, "spool-job/iteration-02.md")[0] == b"Draft 2: an artifact."


async def test_job_result_is_readable_from_s3_in_another_process(s3_env, tmp_path):
    llm, s3 = s3_env
    llm.reset(Script(verdicts=[DONE]))
    with temporary_settings(updates={PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: f"s3-bucket/{RESULTS_BLOCK}"}):
        state = await run_job(job_id="s3-result")
    assert state.is_completed()
    stored = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{RESULTS_FOLDER}/").get("KeyCount", 0)
    assert stored >= 3, "the flow result and both task results should be in S3"
    reader = (
        "import asyncio, sys\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        "        run = await client.read_flow_run(sys.argv[1])\n"
        "    result = await run.state.aresult()\n"
        "    print(result.job_id, result.status.value, result.total_cost_usd)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path),
           "FACTORY_STORAGE_ROOT": str(tmp_path / "elsewhere")}
    out = subprocess.run([sys.executable, "-c", reader, str(state.state_details.flow_run_id)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id, status, cost = out.stdout.split()
    assert (job_id, status) == ("s3-result", "CONVERGED") and float(cost) > 0


PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
       b"\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7V\xbd\xfa\x00\x00\x00\x00IEND\xaeB`\x82")


async def test_image_input_ref_goes_to_the_model_as_an_image(s3_env):
    llm, s3 = s3_env
    s3.client().put_object(Bucket=BUCKET, Key="inputs/dot.png", Body=PNG)
    llm.reset(Script(verdicts=[DONE]))
    state = await run_job(input_refs=[f"s3://{BUCKET}/inputs/dot.png"])
    assert state.is_completed(), state.message
    content = llm.requests[0]["body"]["messages"][0]["content"]
    assert content[0]["type"] == "image" and content[0]["source"]["media_type"] == "image/png"
    assert __import__("base64").b64decode(content[0]["source"]["data"]) == PNG
    assert "inputs/dot.png" in content[1]["text"]

    llm.reset(Script(verdicts=[DONE]))
    state = await run_job(input_refs=[f"s3://{BUCKET}/inputs/dot.png"], executor_model="gpt-5.4-mini",
                          evaluator_model="gpt-5.4-mini")
    assert state.is_completed(), state.message
    part = llm.requests[0]["body"]["messages"][1]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("field", ["output_ref", "log_ref"])
@pytest.mark.parametrize("climb", ["leading-slash", "dot-dot"])
async def test_a_traversing_s3_ref_writes_nothing_outside_the_root(s3_env, storage_root, field, climb):
    """A missing bucket makes every write spool: the key must not steer the spool anywhere."""
    llm, _ = s3_env
    target = Path(tempfile.gettempdir()) / f"factory-escape-{uuid.uuid4().hex[:12]}"
    if climb == "leading-slash":
        key = str(target)  # s3://no-such-bucket//tmp/factory-escape-...
    else:
        key = "../" * len((storage_root / ".spool" / "no-such-bucket").parts) + str(target.relative_to("/"))
    ref = f"s3://no-such-bucket/{key}" + ("/" if field == "output_ref" else "/log.json")
    state = await run_job(**{field: ref})
    assert state.is_failed()
    assert f"`{field}`" in state.message
    assert not target.exists(), f"a spooled write escaped to {target}"
    assert llm.requests == [], "a refused ref must cost nothing"


HANG_BOUND_S = 60  # far past a 2 s retry window, far short of boto3's 60 s-per-attempt defaults times its retries


class SilentServer:
    """Accepts connections on loopback and never answers: an S3 endpoint that hangs."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                self.connections.append(self._sock.accept()[0])
            except TimeoutError:
                continue

    def start(self) -> SilentServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        for conn in [*self.connections, self._sock]:
            conn.close()


@pytest.fixture
async def hanging_store(factory_env, storage_root, monkeypatch):
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters
    from prefect_aws.s3 import S3Bucket

    server = SilentServer().start()
    name = f"hanging-{uuid.uuid4().hex[:8]}"
    credentials = AwsCredentials(aws_access_key_id="hang", aws_secret_access_key="hang", region_name="us-east-1",
                                 aws_client_parameters=AwsClientParameters(endpoint_url=server.url))
    await S3Bucket(bucket_name=BUCKET, credentials=credentials).save(name, overwrite=True)
    monkeypatch.setenv("FACTORY_S3_BLOCK", name)
    monkeypatch.setenv("FACTORY_STORAGE_RETRY_WINDOW_S", "2")
    reset_settings()
    prefix = f"hang-{uuid.uuid4().hex[:8]}"
    yield factory_env, server, prefix
    server.stop()
    shutil.rmtree(storage_root / ".spool" / BUCKET / prefix, ignore_errors=True)  # no later job should drain it
    reset_settings()


async def test_a_write_to_a_hanging_store_is_spooled_within_its_window(hanging_store):
    _, server, prefix = hanging_store
    storage = get_storage()
    location = storage.resolve(f"s3://{BUCKET}/{prefix}/note.md", "output_ref")
    with pytest.raises(StorageSpooled):
        await asyncio.wait_for(storage.write(location, b"kept"), timeout=HANG_BOUND_S)
    assert storage.spool_path(location).read_bytes() == b"kept"
    assert server.connections, "the write should have reached the hanging endpoint"


async def test_a_job_against_a_hanging_store_ends_and_says_where_its_bytes_are(hanging_store, storage_root):
    llm, _, prefix = hanging_store
    llm.reset(Script(verdicts=[DONE]))
    state = await asyncio.wait_for(run_job(output_ref=f"s3://{BUCKET}/{prefix}/"), timeout=HANG_BOUND_S)
    assert state.is_failed() and "kept at" in state.message
    assert (storage_root / ".spool" / BUCKET / prefix / "iteration-01.md").read_bytes() == b"Draft 1: an artifact."


@pytest.mark.fast
async def test_boto_makes_one_attempt_with_timeouts_that_fit_the_window():
    from prefect_aws import AwsCredentials

    store = S3Store("no-such-block", retry_window_s=30)
    store._credentials = AwsCredentials(region_name="us-east-1", aws_client_parameters={
        "endpoint_url": "http://127.0.0.1:9", "config": {"retries": {"max_attempts": 9}, "signature_version": "s3v4"}})
    for attempt_s in (int(ATTEMPT_TIMEOUT_S), 3, 1):
        config = (await store.client(attempt_s)).meta.config
        assert config.retries["total_max_attempts"] == 1, "retries are ours alone"
        assert config.connect_timeout + config.read_timeout <= attempt_s
        assert config.signature_version == "s3v4", "the block's own botocore config is kept"


@pytest.mark.fast
async def test_no_attempt_starts_that_could_end_past_the_window(monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    store = S3Store("no-such-block", retry_window_s=3)
    started = time.monotonic()
    attempts: list[tuple[float, int]] = []

    async def refused(attempt_s: int):
        attempts.append((3 - (time.monotonic() - started), attempt_s))
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    monkeypatch.setattr(store, "client", refused)
    with pytest.raises(StorageError, match="stayed unreachable for 3s"):
        await asyncio.wait_for(store.write(BUCKET, "k", b"x", "text/plain"), timeout=HANG_BOUND_S)
    assert len(attempts) >= 3, "a store that refuses fast is retried through the window"
    assert all(attempt_s <= left for left, attempt_s in attempts), attempts


async def test_a_job_with_its_refs_in_s3_leaves_nothing_of_its_own_on_the_worker(s3_env, storage_root):
    llm, s3 = s3_env
    llm.reset(Script(verdicts=[NOT_YET, DONE]))
    prefix = f"s3://{BUCKET}/jobs/s3-only"
    result: JobResult = await (await run_job(job_id="s3-only", output_ref=f"{prefix}/",
                                             log_ref=f"{prefix}/log.json")).result()
    assert result.stop_reason is StopReason.CONFORMITY
    stored = JobResult.model_validate_json(s3_object(s3, "jobs/s3-only/result.json")[0])
    assert stored.total_cost_usd == result.total_cost_usd and stored.log_ref == f"{prefix}/log.json"
    left = [p for p in storage_root.rglob("*") if "s3-only" in str(p.relative_to(storage_root))]
    assert left == [], "the result, log and artifacts belong in S3, not on an ephemeral worker's disk"
