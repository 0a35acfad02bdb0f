"""A Prefect worker type that runs flow runs on a RunPod serverless endpoint.

    prefect work-pool create factory-gpu --type runpod
    prefect worker start --pool factory-gpu

Each flow run becomes one RunPod job: `POST {api_url}/{endpoint_id}/run` with the flow run's
command and environment as input, which this project's `handler.py` executes on a GPU worker.
The worker polls `/status/{id}` until the job ends and maps RunPod's outcome to the flow run;
cancelling the flow run in Prefect calls `/cancel/{id}`.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import httpx
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import InfrastructureNotFound
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field, SecretStr

DEFAULT_API_URL = "https://api.runpod.ai/v2"
DEFAULT_EXECUTION_TIMEOUT_S = 3600
DEFAULT_TTL_S = 24 * 3600
DEFAULT_POLL_INTERVAL_S = 2.0
REQUEST_TIMEOUT_S = 30.0
ENDPOINT_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# RunPod job states that end a job, and the exit status each one gives the flow run.
TERMINAL = {"COMPLETED": 0, "FAILED": 1, "TIMED_OUT": 124, "CANCELLED": 130}


class RunPodJobConfiguration(BaseJobConfiguration):
    endpoint_id: str = Field(pattern=ENDPOINT_ID_PATTERN)
    api_key: SecretStr | None = Field(default=None)
    api_url: str = Field(default=DEFAULT_API_URL)
    execution_timeout_s: int = Field(default=DEFAULT_EXECUTION_TIMEOUT_S, ge=5)
    ttl_s: int = Field(default=DEFAULT_TTL_S, ge=10)
    poll_interval_s: float = Field(default=DEFAULT_POLL_INTERVAL_S, gt=0)

    def key(self) -> str:
        key = self.api_key.get_secret_value() if self.api_key else os.environ.get("RUNPOD_API_KEY")
        if not key:
            raise ValueError("no RunPod API key: set the pool's `api_key` job variable (a Secret block reference "
                             "works: {{ prefect.blocks.secret.runpod-api-key }}) or RUNPOD_API_KEY on the worker.")
        return key


class RunPodVariables(BaseVariables):
    endpoint_id: str = Field(
        default=..., pattern=ENDPOINT_ID_PATTERN,
        description="The RunPod serverless endpoint that runs this project's image (handler.py).")
    api_key: SecretStr | None = Field(
        default=None,
        description="RunPod API key; e.g. {{ prefect.blocks.secret.runpod-api-key }}. Empty: RUNPOD_API_KEY "
                    "on the worker.")
    api_url: str = Field(
        default=DEFAULT_API_URL,
        description=f"RunPod serverless API base URL (default {DEFAULT_API_URL}); override for regions or tests.")
    execution_timeout_s: int = Field(
        default=DEFAULT_EXECUTION_TIMEOUT_S, ge=5,
        description=f"RunPod's execution timeout for the job, in seconds (default {DEFAULT_EXECUTION_TIMEOUT_S}).")
    ttl_s: int = Field(
        default=DEFAULT_TTL_S, ge=10,
        description=f"How long RunPod keeps the job, queued and running, in seconds (default {DEFAULT_TTL_S}).")
    poll_interval_s: float = Field(
        default=DEFAULT_POLL_INTERVAL_S, gt=0,
        description=f"Seconds between status polls (default {DEFAULT_POLL_INTERVAL_S}).")


class RunPodWorkerResult(BaseWorkerResult):
    """The RunPod job id and the exit status its outcome maps to."""


class RunPodWorker(BaseWorker[RunPodJobConfiguration, RunPodVariables, RunPodWorkerResult]):
    type = "runpod"
    job_configuration = RunPodJobConfiguration
    job_configuration_variables = RunPodVariables
    _description = "Runs each flow run as a job on a RunPod serverless endpoint (GPU, scaling from zero)."
    _display_name = "RunPod"

    async def run(self, flow_run: FlowRun, configuration: RunPodJobConfiguration,
                  task_status: anyio.abc.TaskStatus | None = None) -> RunPodWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        async with _client(configuration) as client:
            response = await client.post(f"/{configuration.endpoint_id}/run", json={
                "input": {"command": configuration.command,
                          "env": {k: v for k, v in configuration.env.items() if v is not None}},
                "policy": {"executionTimeout": configuration.execution_timeout_s * 1000,
                           "ttl": configuration.ttl_s * 1000},
            })
            _raise_for_status(response, configuration.endpoint_id)
            job_id = response.json()["id"]
            logger.info("Submitted to RunPod endpoint %s as job %s", configuration.endpoint_id, job_id)
            if task_status is not None:
                task_status.started(job_id)
            status, cancelled_here = await self._wait(client, configuration, job_id, flow_run)
        if cancelled_here:
            current = await self.client.read_flow_run(flow_run.id)
            if current.state is not None and current.state.is_cancelling():  # it never started: close it here
                await self._mark_flow_run_as_cancelled(current, state_updates={
                    "message": f"Cancelled in Prefect; RunPod job {job_id} cancelled."})
            logger.info("RunPod job %s cancelled with its flow run", job_id)
            return RunPodWorkerResult(identifier=job_id, status_code=0)
        code = TERMINAL[status["status"]]
        if status["status"] == "COMPLETED":
            code = int((status.get("output") or {}).get("exit_code", 0))
        else:  # the flow run never got to report its end: say why it stopped, in RunPod's words
            detail = status.get("error") or (f"execution timeout of {configuration.execution_timeout_s} s"
                                             if status["status"] == "TIMED_OUT" else "no detail")
            await self._propose_crashed_state(flow_run, f"RunPod job {job_id} {status['status']}: {detail}")
        return RunPodWorkerResult(identifier=job_id, status_code=code)

    async def _wait(self, client: httpx.AsyncClient, configuration: RunPodJobConfiguration, job_id: str,
                    flow_run: FlowRun) -> tuple[dict, bool]:
        """Poll until the job ends; cancel it once its flow run is cancelled in Prefect.

        Returns the final status and whether this worker cancelled the job. Prefect itself only cancels
        runs that never started, and only with PREFECT_WORKER_ENABLE_CANCELLATION, so the worker watches.
        """
        cancelled_here = False
        while True:
            response = await client.get(f"/{configuration.endpoint_id}/status/{job_id}")
            _raise_for_status(response, configuration.endpoint_id)
            status = response.json()
            if status.get("status") in TERMINAL:
                return status, cancelled_here and status["status"] == "CANCELLED"
            if not cancelled_here and await self._cancel_requested(flow_run):
                _raise_for_status(await client.post(f"/{configuration.endpoint_id}/cancel/{job_id}"),
                                  configuration.endpoint_id)
                cancelled_here = True
            await anyio.sleep(configuration.poll_interval_s)

    async def _cancel_requested(self, flow_run: FlowRun) -> bool:
        state = (await self.client.read_flow_run(flow_run.id)).state
        return state is not None and (state.is_cancelling() or state.is_cancelled())

    async def kill_infrastructure(self, infrastructure_pid: str, configuration: RunPodJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        async with _client(configuration) as client:
            response = await client.post(f"/{configuration.endpoint_id}/cancel/{infrastructure_pid}")
        if response.status_code == 404:
            raise InfrastructureNotFound(f"RunPod job {infrastructure_pid} not found on {configuration.endpoint_id}")
        _raise_for_status(response, configuration.endpoint_id)


def _client(configuration: RunPodJobConfiguration) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=configuration.api_url.rstrip("/"), timeout=REQUEST_TIMEOUT_S,
                             headers={"Authorization": f"Bearer {configuration.key()}"})


def _raise_for_status(response: httpx.Response, endpoint_id: str) -> None:
    if response.status_code in (401, 403):
        raise RuntimeError(f"RunPod refused the API key (HTTP {response.status_code}) for endpoint '{endpoint_id}'.")
    if response.status_code == 404:
        raise RuntimeError(f"RunPod endpoint '{endpoint_id}' not found. Check the pool's `endpoint_id`.")
    response.raise_for_status()
