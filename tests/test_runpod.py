"""The `runpod` worker type end to end: a real Prefect server, `prefect worker start --pool factory-gpu`,
the RunPod serverless emulator running this project's handler.py, and the handler's own CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.emulators.llm import Script
from tests.emulators.runpod import REPO, RUNPOD_KEY, RunPodEmulator, runpod_pool_options
from tests.emulators.server import ThreadedServer
from tests.helpers import DONE, NOT_YET
from tests.processes import deployment_run, run_cli, served_deployment, wait_state

pytestmark = pytest.mark.cli
FINAL = {"COMPLETED", "FAILED", "CRASHED"}
DRY = {"executor_model": "dry-run", "evaluator_model": "dry-run"}


@pytest.fixture(scope="module")
def runpod_api():
    emulator = RunPodEmulator()
    server = ThreadedServer(emulator.app).start()
    yield emulator, f"{server.url}/v2"
    emulator.stop_all()
    server.stop()


@pytest.fixture(scope="module")
def gpu_pool(llm_server, runpod_api, tmp_path_factory):
    emulator, api_url = runpod_api
    with served_deployment(tmp_path_factory.mktemp("gpu"), {"RUNPOD_API_KEY": RUNPOD_KEY}, pool="factory-gpu",
                           pool_options=runpod_pool_options(api_url),
                           prefect_file="tests/prefect-gpu.yaml") as served:
        yield {**served, "emulator": emulator}


def start_run(gpu_pool, job_id: str, job_variables: dict | None = None, **params) -> str:
    body = {"seed": "Write a haiku.", "objective": "A haiku.", "job_id": job_id, **params}
    options = []
    for name, value in (job_variables or {}).items():
        options += ["--job-variable", f"{name}={json.dumps(value)}"]
    return deployment_run(gpu_pool["env"], body, *options, deployment="factory/gpu-job")


def read_state(gpu_pool, flow_run_id: str) -> dict:
    return httpx.get(f"{gpu_pool['api_url']}/flow_runs/{flow_run_id}", timeout=10).json()["state"]


def state_history(gpu_pool, flow_run_id: str) -> list[str]:
    states = httpx.get(f"{gpu_pool['api_url']}/flow_run_states/", params={"flow_run_id": flow_run_id}, timeout=10)
    return [state["type"] for state in states.json()]


def wait_logged(gpu_pool, text: str, timeout_s: float = 90) -> str:
    """The worker's log once it holds `text` (bounded)."""
    deadline = time.monotonic() + timeout_s
    while text not in (log := gpu_pool["worker"].log.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never logged: " + log[-3000:]
        time.sleep(0.3)
    return log


def test_default_job_template_lists_the_runpod_variables(gpu_pool):
    template = json.loads(run_cli(["work-pool", "get-default-base-job-template", "--type", "runpod"],
                                  gpu_pool["env"]).stdout)
    variables = template["variables"]["properties"]
    assert {"endpoint_id", "api_key", "api_url", "execution_timeout_s", "ttl_s", "poll_interval_s", "env",
            "command"} <= set(variables)
    assert all(variables[name].get("description") for name in ("endpoint_id", "api_url", "ttl_s"))


def test_flow_run_executes_on_the_runpod_endpoint(gpu_pool):
    flow_run_id = start_run(gpu_pool, "gpu-1", executor_model="dry-run", evaluator_model="dry-run")
    assert wait_state(gpu_pool, flow_run_id, {"COMPLETED", "FAILED", "CRASHED"}) == "COMPLETED"
    jobs = list(gpu_pool["emulator"].jobs.values())
    deadline = time.monotonic() + 30
    while jobs[-1].status == "IN_PROGRESS" and time.monotonic() < deadline:  # the process is exiting
        time.sleep(0.2)
    assert jobs[-1].status == "COMPLETED" and jobs[-1].output == {"exit_code": 0}
    assert "prefect flow-run execute" in jobs[-1].payload["input"]["command"]
    assert jobs[-1].payload["input"]["env"]["PREFECT__FLOW_RUN_ID"] == flow_run_id
    run = httpx.get(f"{gpu_pool['api_url']}/flow_runs/{flow_run_id}", timeout=10).json()
    assert run["infrastructure_pid"] == jobs[-1].id


@pytest.mark.parametrize("outcome", ["FAILED", "TIMED_OUT"])
def test_a_failed_runpod_job_fails_the_flow_run(gpu_pool, outcome):
    gpu_pool["emulator"].force = outcome
    flow_run_id = start_run(gpu_pool, f"gpu-{outcome.lower()}", executor_model="dry-run", evaluator_model="dry-run")
    assert wait_state(gpu_pool, flow_run_id, {"COMPLETED", "FAILED", "CRASHED"}) in {"FAILED", "CRASHED"}
    assert outcome in gpu_pool["worker"].log.read_text()


def test_the_worker_keeps_following_a_job_through_failed_status_polls(gpu_pool):
    """A 502, an answer slower than the request timeout, a body that is not JSON, one without a status and a
    429 from /status delay the worker but never make it let go: it still maps the job's end onto the run."""
    emulator = gpu_pool["emulator"]
    faults = ["502", "hang", "not-json", "no-status", "429"]
    emulator.force, emulator.status_faults = "FAILED", list(faults)
    logged_before = len(gpu_pool["worker"].log.read_text())
    flow_run_id = start_run(gpu_pool, "gpu-flaky-status", {"request_timeout_s": 1, "poll_interval_s": 0.1}, **DRY)
    assert wait_state(gpu_pool, flow_run_id, FINAL, timeout_s=120) == "CRASHED"
    job_id = httpx.get(f"{gpu_pool['api_url']}/flow_runs/{flow_run_id}", timeout=10).json()["infrastructure_pid"]
    assert read_state(gpu_pool, flow_run_id)["message"] == f"RunPod job {job_id} FAILED: emulated FAILED"
    assert emulator.jobs[job_id].faults == [], "every scripted fault was polled through"
    log = gpu_pool["worker"].log.read_text()[logged_before:]
    for said in ("(HTTP 502)", "(no answer in 1 s)", "(a body that is not JSON", "(a body without a job status",
                 "(HTTP 429)"):
        assert f"Could not read the status of RunPod job {job_id} {said}" in log
    assert "still following it" in log and "Lost connection" not in log


def test_a_job_runpod_no_longer_knows_is_reported_clearly(gpu_pool):
    """404 from /status is not retried: the worker says which job is gone and why it may be."""
    emulator = gpu_pool["emulator"]
    emulator.hold, emulator.status_faults = True, ["404"]
    flow_run_id = start_run(gpu_pool, "gpu-gone", **DRY)
    log = wait_logged(gpu_pool, "does not know job")
    job_id = httpx.get(f"{gpu_pool['api_url']}/flow_runs/{flow_run_id}", timeout=10).json()["infrastructure_pid"]
    assert f"RunPod does not know job {job_id} on endpoint 'factory-gpu-test' (HTTP 404)" in log
    assert "expired (`ttl_s`)" in log
    assert run_cli(["flow-run", "cancel", flow_run_id], gpu_pool["env"]).returncode == 0  # nobody follows it now


@pytest.mark.parametrize("job_id, output", [
    ("gpu-refused", {"status": "error", "error": "`input.command`: not a command the worker sends"}),
    ("gpu-bare-error", {"error": "CUDA out of memory"})])
def test_a_handler_error_without_an_exit_code_fails_the_flow_run(gpu_pool, job_id, output):
    """The handler answered without running the flow run: the run fails with the handler's words (one that
    Completed or stayed Pending would hide them), never having started."""
    gpu_pool["emulator"].output = output
    flow_run_id = start_run(gpu_pool, job_id, **DRY)
    assert wait_state(gpu_pool, flow_run_id, FINAL, timeout_s=90) == "FAILED"
    message = read_state(gpu_pool, flow_run_id)["message"]
    assert message.endswith(f"COMPLETED without running the flow run: the handler refused it: {output['error']}")
    assert "RUNNING" not in state_history(gpu_pool, flow_run_id)


@pytest.mark.parametrize("job_id, variables, field", [
    ("gpu-command-refused", {"command": "sh -c 'touch {marker}'"}, "`input.command`: `sh -c 'touch "),
    ("gpu-env-refused", {"env": {"LD_PRELOAD": "{marker}.so"}}, "`input.env.LD_PRELOAD`: refused")])
def test_the_endpoint_runs_only_what_the_worker_sends(gpu_pool, tmp_path, job_id, variables, field):
    """A pool whose `command` or `env` asks the handler for something else: the handler refuses it and runs
    nothing; the flow run fails with the handler's reason and never started."""
    marker = tmp_path / "marker"
    variables = json.loads(json.dumps(variables).replace("{marker}", str(marker)))
    flow_run_id = start_run(gpu_pool, job_id, variables, **DRY)
    assert wait_state(gpu_pool, flow_run_id, FINAL, timeout_s=90) == "FAILED"
    message = read_state(gpu_pool, flow_run_id)["message"]
    assert f"the handler refused it: refused, nothing was run: {field}" in message, message
    assert "RUNNING" not in state_history(gpu_pool, flow_run_id) and not marker.exists()


def test_cancelling_a_queued_run_cancels_the_runpod_job(gpu_pool):
    gpu_pool["emulator"].hold = True  # no GPU worker picks the job up: the flow run stays pending
    flow_run_id = start_run(gpu_pool, "gpu-queued", executor_model="dry-run", evaluator_model="dry-run")
    deadline = time.monotonic() + 60
    while not (run := httpx.get(f"{gpu_pool['api_url']}/flow_runs/{flow_run_id}", timeout=10).json())[
            "infrastructure_pid"]:
        assert time.monotonic() < deadline, gpu_pool["worker"].log.read_text()[-3000:]
        time.sleep(0.3)
    cancel = run_cli(["flow-run", "cancel", flow_run_id], gpu_pool["env"])
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert wait_state(gpu_pool, flow_run_id, {"CANCELLED"}, timeout_s=90) == "CANCELLED"
    assert run["infrastructure_pid"] in gpu_pool["emulator"].cancelled
    assert gpu_pool["emulator"].jobs[run["infrastructure_pid"]].status == "CANCELLED"


def test_cancelling_a_running_flow_run_ends_its_runpod_job(gpu_pool, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET], latency_s=1.0))
    flow_run_id = start_run(gpu_pool, "gpu-cancel", limits={"max_cycles": 30})
    wait_state(gpu_pool, flow_run_id, {"RUNNING"})
    time.sleep(2)
    cancel = run_cli(["flow-run", "cancel", flow_run_id], gpu_pool["env"])
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert wait_state(gpu_pool, flow_run_id, {"CANCELLED"}, timeout_s=90) == "CANCELLED"
    job_id = httpx.get(f"{gpu_pool['api_url']}/flow_runs/{flow_run_id}", timeout=10).json()["infrastructure_pid"]
    deadline = time.monotonic() + 30
    while gpu_pool["emulator"].jobs[job_id].status == "IN_PROGRESS":
        assert time.monotonic() < deadline, "the RunPod job kept running after the cancel"
        time.sleep(0.3)


def test_handler_runs_the_original_api_from_its_cli(tmp_path):
    test_input = {"input": {"seed": "Write a haiku.", "objective": "A haiku.", "job_id": "handler-cli",
                            "executor_model": "dry-run", "evaluator_model": "dry-run"}}
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "FACTORY_STORAGE_ROOT": str(tmp_path / "store")}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(test_input)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'status': 'success'" in out.stdout + out.stderr and "'CONVERGED'" in out.stdout + out.stderr
    bad = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps({"input": {"seed": ""}})],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    text = bad.stdout + bad.stderr
    assert "`seed`" in text and "`objective`" in text, "every problem is reported at once"
    assert not (tmp_path / "store" / "handler-cli" / "result.json").read_text() == ""


@pytest.mark.parametrize("variable, value", [("endpoint_id", "bad id!"), ("execution_timeout_s", 1),
                                             ("poll_interval_s", 0)])
def test_bad_job_variables_are_refused_before_any_runpod_job(gpu_pool, variable, value):
    jobs_before = len(gpu_pool["emulator"].jobs)
    body = {"seed": "s", "objective": "o", "executor_model": "dry-run", "evaluator_model": "dry-run"}
    run = run_cli(["deployment", "run", "factory/gpu-job", "--params", json.dumps(body), "--job-variable",
                   f"{variable}={json.dumps(value)}"], gpu_pool["env"])
    assert run.returncode != 0
    assert variable in run.stdout + run.stderr
    assert len(gpu_pool["emulator"].jobs) == jobs_before


async def test_handler_reports_progress_after_each_iteration(factory_env, monkeypatch):
    import runpod

    import handler

    updates = []
    monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "http://127.0.0.1:9/job-done/$ID")  # set on RunPod workers
    monkeypatch.setattr(runpod.serverless, "progress_update",
                        lambda job, progress: updates.append((job["id"], progress)))
    factory_env.reset(Script(verdicts=[NOT_YET, DONE]))
    reply = await handler.handler({"id": "rp-1", "input": {"seed": "Write a haiku.", "objective": "A haiku.",
                                                           "job_id": "rp-progress"}})
    assert reply["status"] == "success" and reply["result"]["total_iterations"] == 2
    assert [(job, p["iteration"], p["converged"]) for job, p in updates] == [("rp-1", 1, False), ("rp-1", 2, True)]
    failed = await handler.handler({"id": "rp-2", "input": {"seed": "s", "objective": "o",
                                                            "executor_model": "claude-unpriced-9"}})
    assert failed["status"] == "error" and "`executor_model`" in failed["error"]


def test_handler_runs_a_whole_image_job_on_its_own_gpu(tmp_path, llm_server):
    """The original API on the GPU image: the model is preloaded when the worker starts (outside the handler
    function) and the job generates in-process (FACTORY_GPU_LOCAL), judged by the evaluator emulator."""
    from tests.tiny_pipeline import build_tiny_text_to_image_pipeline

    llm_server.reset()
    models = tmp_path / "models"
    build_tiny_text_to_image_pipeline(models / "tiny-sd")
    test_input = {"input": {"seed": "A red circle.", "objective": "A red circle.", "job_id": "handler-gpu",
                            "function": "IMAGE_GENERATION", "executor_model": "diffusers:tiny-sd"}}
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "FACTORY_STORAGE_ROOT": str(tmp_path / "store"),
           "FACTORY_GPU_LOCAL": "1", "FACTORY_MODELS_DIR": str(models), "FACTORY_PRELOAD_MODELS": "tiny-sd",
           "FACTORY_DIFFUSERS_STEPS": "2", "FACTORY_MEDIA_WIDTH": "64", "FACTORY_MEDIA_HEIGHT": "64",
           "HF_HUB_OFFLINE": "1", "FACTORY_PRICES": '{"diffusers:tiny-sd": {"per_gpu_second": 0.0002}}'}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(test_input)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'status': 'success'" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    result = json.loads((tmp_path / "store" / "handler-gpu" / "result.json").read_text())
    assert result["status"] == "CONVERGED" and result["final_artifact_ref"].endswith(".png")
    [judged] = [r for r in llm_server.requests if r["api"] == "anthropic" and r["body"].get("tools")]
    assert any(block["type"] == "image" for block in judged["body"]["messages"][0]["content"])
