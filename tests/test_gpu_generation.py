"""GPU generation end to end, as deployed: a real Prefect server; the job flow as `factory/job` on a process
worker (`factory-local`); its image generation as child flow runs on the `factory-gpu` pool, picked up by a
`runpod` worker process, sent to the RunPod emulator, and executed by handler.py from bundles stored in a
real S3 server (moto) with results in S3 too. The GPU model is a tiny random diffusers pipeline, run on
the CPU; the evaluator is the Anthropic emulator, which must receive the image itself."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.browser import Browser
from tests.emulators.runpod import REPO, RUNPOD_KEY, RunPodEmulator
from tests.emulators.server import ThreadedServer
from tests.processes import (
    FINAL_STATES,
    Background,
    deployment_run,
    prefect_bin,
    run_cli,
    served_deployment,
    wait_state,
)
from tests.s3server import BUCKET
from tests.tiny_pipeline import build_tiny_text_to_image_pipeline

pytestmark = pytest.mark.cli
GPU_PRICE_PER_S = Decimal("0.00031")
MISSING_MODEL = "no-such-model"  # under FACTORY_MODELS_DIR, where nothing is


@pytest.fixture(scope="module")
def gpu_stack(llm_server, s3_server, tmp_path_factory):
    emulator = RunPodEmulator()
    runpod_api = ThreadedServer(emulator.app).start()
    model = build_tiny_text_to_image_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")
    # What the RunPod workers (the emulator's handler processes) inherit: offline, two denoising steps.
    gpu_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FACTORY_DIFFUSERS_STEPS": "2"}
    saved = {name: os.environ.get(name) for name in gpu_env}
    os.environ.update(gpu_env)
    job_env = {"RUNPOD_API_KEY": RUNPOD_KEY, "FACTORY_MEDIA_WIDTH": "64", "FACTORY_MEDIA_HEIGHT": "64",
               "FACTORY_GPU_TIMEOUT_S": "240", "FACTORY_RETRIES": "2", "FACTORY_RETRY_DELAY_S": "0.1",
               "FACTORY_PRICES": json.dumps({f"diffusers:{name}": {"per_gpu_second": str(GPU_PRICE_PER_S)}
                                             for name in (model, MISSING_MODEL)})}
    work = tmp_path_factory.mktemp("gpu-stack")

    def gpu_pool(env: dict[str, str], _: Path) -> None:
        """The README's way: blocks from the environment, then scripts/gpu-pool.sh."""
        registered = subprocess.run([sys.executable, "-m", "blocks.register"], env=env, capture_output=True,
                                    text=True, timeout=120)
        assert registered.returncode == 0, registered.stderr
        made = subprocess.run(["scripts/gpu-pool.sh", "factory-gpu-test", f"api_url={runpod_api.url}/v2",
                               "poll_interval_s=0.5"],
                              env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
                              cwd=REPO, capture_output=True, text=True, timeout=180)
        assert made.returncode == 0, made.stdout + made.stderr

    try:
        with served_deployment(work, job_env, pool="factory-gpu", pool_options=gpu_pool,
                               prefect_file="tests/prefect-gpu.yaml") as served:
            env = served["env"]
            assert run_cli(["work-pool", "create", "factory-local", "--type", "process"], env).returncode == 0
            deployed = run_cli(["--no-prompt", "deploy", "--all"], env)
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            cpu_worker = Background([prefect_bin(), "worker", "start", "--pool", "factory-local"], env,
                                    work / "cpu-worker.log")
            try:
                yield {**served, "emulator": emulator, "model": model, "cpu_worker": cpu_worker, "s3": s3_server}
            finally:
                cpu_worker.stop()
    finally:
        emulator.stop_all()
        runpod_api.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_job(stack, job_id: str, model: str | None = None) -> str:
    params = {"seed": "A red circle on a white background.", "objective": "A single red circle, centred.",
              "function": "IMAGE_GENERATION", "job_id": job_id,
              "executor_model": f"diffusers:{model or stack['model']}"}
    return deployment_run(stack["env"], params)


def wait_job(stack, flow_run_id: str, states: set[str] = FINAL_STATES, timeout_s: float = 300) -> str:
    return wait_state({**stack, "worker": stack["cpu_worker"]}, flow_run_id, states, timeout_s)


def children(stack, parent_id: str) -> list[dict]:
    body = {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return httpx.post(f"{stack['api_url']}/flow_runs/filter", json=body, timeout=10).json()


def logs(stack) -> str:
    return "\n".join(p.log.read_text()[-4000:] for p in (stack["worker"], stack["cpu_worker"]))


def test_an_image_job_generates_on_the_gpu_pool_and_the_evaluator_sees_the_image(gpu_stack, llm_server):
    llm_server.reset()
    parent = start_job(gpu_stack, "gpu-image")
    assert wait_job(gpu_stack, parent) == "COMPLETED", logs(gpu_stack)
    result = json.loads((gpu_stack["storage"] / "gpu-image" / "result.json").read_text())
    assert result["status"] == "CONVERGED" and result["total_iterations"] == 1
    image = Path(result["final_artifact_ref"]).read_bytes()
    assert Image.open(io.BytesIO(image)).size == (64, 64)

    [child] = children(gpu_stack, parent)
    assert child["state"]["type"] == "COMPLETED" and child["work_pool_name"] == "factory-gpu"
    [job] = [j for j in gpu_stack["emulator"].jobs.values() if j.payload["input"]["env"].get(
        "PREFECT__FLOW_RUN_ID") == child["id"]]
    deadline = time.monotonic() + 30
    while job.status == "IN_PROGRESS" and time.monotonic() < deadline:  # the handler's process is exiting
        time.sleep(0.2)
    assert job.status == "COMPLETED" and "bundles.execute" in job.payload["input"]["command"]
    keys = [o["Key"] for o in gpu_stack["s3"].client().list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(k.startswith("results/") for k in keys), keys  # the child's MediaResult, read back from S3

    [judged] = [r for r in llm_server.requests if r["api"] == "anthropic" and r["body"].get("tools")]
    blocks = judged["body"]["messages"][0]["content"]
    [shown] = [b for b in blocks if b["type"] == "image"]
    assert base64.b64decode(shown["source"]["data"]) == image
    assert "64x64" in json.dumps(blocks) or "64 x 64" in json.dumps(blocks)

    executor = [e for e in json.loads((gpu_stack["storage"] / "gpu-image" / "log.json").read_text())["events"]
                if e["event"] == "EXECUTOR_RESPONSE"][0]["data"]
    gpu_seconds = Decimal(str(executor["metadata"]["gpu_seconds"]))
    assert gpu_seconds >= 1 and gpu_seconds == gpu_seconds.to_integral_value()
    assert Decimal(str(executor["cost_usd"])) == gpu_seconds * GPU_PRICE_PER_S


@pytest.mark.parametrize("outcome", ["FAILED", "TIMED_OUT"])
def test_a_failed_runpod_job_crashes_the_child_and_the_parent_retries(gpu_stack, llm_server, outcome):
    llm_server.reset()
    gpu_stack["emulator"].force = outcome
    parent = start_job(gpu_stack, f"gpu-retry-{outcome.lower()}")
    assert wait_job(gpu_stack, parent) == "COMPLETED", logs(gpu_stack)
    first, second = children(gpu_stack, parent)
    assert first["state"]["type"] == "CRASHED" and outcome in first["state"]["message"]
    assert second["state"]["type"] == "COMPLETED"
    result = json.loads((gpu_stack["storage"] / f"gpu-retry-{outcome.lower()}" / "result.json").read_text())
    assert result["status"] == "CONVERGED"
    # RunPod bills the failed job too: it is counted, then the retry, and the total is their sum with the verdict.
    events = json.loads((gpu_stack["storage"] / f"gpu-retry-{outcome.lower()}" / "log.json").read_text())["events"]
    calls = [c for e in events if e["event"] == "ITERATION_END" for c in e["data"]["calls"]]
    failed, made = [c for c in calls if c["role"] == "executor"]
    assert outcome in failed["failed"] and Decimal(str(failed["cost_usd"])) >= GPU_PRICE_PER_S
    assert made["failed"] is None
    total = sum(Decimal(str(c["cost_usd"])) for c in calls)
    assert abs(Decimal(str(result["total_cost_usd"])) - total) < Decimal("1e-12")


def test_a_missing_gpu_model_fails_the_job_at_once_with_its_reason(gpu_stack, llm_server):
    llm_server.reset()
    parent = start_job(gpu_stack, "gpu-missing-model", model=MISSING_MODEL)
    assert wait_job(gpu_stack, parent) == "FAILED", logs(gpu_stack)
    [child] = children(gpu_stack, parent)  # not retried: a new run cannot find the model either
    assert child["state"]["type"] == "FAILED"
    result = json.loads((gpu_stack["storage"] / "gpu-missing-model" / "result.json").read_text())
    assert result["status"] == "FAILED" and "no diffusers pipeline" in result["error"]
    assert llm_server.requests == [], "nothing was judged"


def test_cancelling_the_job_cancels_its_runpod_job(gpu_stack, llm_server):
    llm_server.reset()
    gpu_stack["emulator"].hold = True  # no GPU worker free: the RunPod job waits in the queue
    parent = start_job(gpu_stack, "gpu-cancel")
    deadline = time.monotonic() + 120
    while not (kids := children(gpu_stack, parent)) or not httpx.get(
            f"{gpu_stack['api_url']}/flow_runs/{kids[0]['id']}", timeout=10).json()["infrastructure_pid"]:
        assert time.monotonic() < deadline, logs(gpu_stack)
        time.sleep(0.5)
    job_id = httpx.get(f"{gpu_stack['api_url']}/flow_runs/{kids[0]['id']}", timeout=10).json()["infrastructure_pid"]
    cancel = run_cli(["flow-run", "cancel", parent], gpu_stack["env"])
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert wait_job(gpu_stack, parent, {"CANCELLED"}, timeout_s=90) == "CANCELLED"
    assert wait_state(gpu_stack, kids[0]["id"], {"CANCELLED"}, timeout_s=90) == "CANCELLED"
    assert gpu_stack["emulator"].jobs[job_id].status == "CANCELLED" and job_id in gpu_stack["emulator"].cancelled


@pytest.mark.browser
async def test_the_prefect_ui_shows_the_generated_image_and_its_gpu_child_run(gpu_stack, llm_server, tmp_path):
    llm_server.reset()
    parent = start_job(gpu_stack, "gpu-ui")
    assert wait_job(gpu_stack, parent) == "COMPLETED", logs(gpu_stack)
    ui = gpu_stack["api_url"].removesuffix("/api")
    async with Browser() as browser:
        await browser.goto(f"{ui}/runs/flow-run/{parent}")
        await browser.wait_for_text("Artifacts")
        await browser.click_text(".p-tab", "Artifacts")
        await browser.wait_for_text("factory-gpu-ui-iteration-1-image")
        await browser.click_text("a, .p-link, div", "factory-gpu-ui-iteration-1-image")
        deadline = time.monotonic() + 30
        while not (shown := await browser.evaluate(
                "[...document.images].filter(i => i.src.startsWith('data:image/jpeg') && i.naturalWidth > 0)"
                ".map(i => [i.naturalWidth, i.naturalHeight])")):
            assert time.monotonic() < deadline, "the thumbnail never rendered"
            await asyncio.sleep(0.3)
        await browser.screenshot(tmp_path / "generated-image.png")
        await browser.goto(f"{ui}/runs/flow-run/{children(gpu_stack, parent)[0]['id']}")
        page = await browser.wait_for_text("factory-gpu-image")
    assert shown == [[64, 64]]
    assert "Completed" in page
