"""A Prefect worker type that runs flow runs on a RunPod serverless endpoint.

    prefect work-pool create factory-gpu --type runpod
    prefect worker start --pool factory-gpu

Each flow run becomes one RunPod job: `POST {api_url}/{endpoint_id}/run` with the flow run's
command and environment as input, which this project's `handler.py` executes on a GPU worker.
The worker polls `/status/{id}` until the job ends and maps RunPod's outcome to the flow run;
cancelling the flow run in Prefect calls `/cancel/{id}`. A poll that fails in a way that can pass
(connection error, timeout, 429, 5xx, a body that is not a status) is retried with a growing delay:
the worker never stops following a job it submitted, which keeps running and billing either way.
"""

from __future__ import annotations

import json
import os
from logging import LoggerAdapter
from typing import Any

import anyio
import httpx
from prefect.client.schemas.objects import FlowRun, State
from prefect.exceptions import Abort, InfrastructureNotFound
from prefect.states import Crashed, Failed
from prefect.utilities.engine import propose_state
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field, SecretStr

DEFAULT_API_URL = "https://api.runpod.ai/v2"
DEFAULT_EXECUTION_TIMEOUT_S = 3600
DEFAULT_TTL_S = 24 * 3600
DEFAULT_POLL_INTERVAL_S = 2.0
REQUEST_TIMEOUT_S = 30.0
# After a failed poll the delay doubles from the poll interval up to this, and resets after a good one.
MAX_POLL_BACKOFF_S = 30.0
ENDPOINT_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# RunPod job states that end a job, and the exit status each one gives the flow run.
TERMINAL = {"COMPLETED": 0, "FAILED": 1, "TIMED_OUT": 124, "CANCELLED": 130}


class RunPodError(RuntimeError):
    """RunPod refused a request in a way that asking again cannot fix: the key, the endpoint, the job id."""


class TransientPollError(Exception):
    """A status poll that failed in a way that can pass (network, timeout, 429, 5xx, a garbled body)."""


class RunPodJobConfiguration(BaseJobConfiguration):
    endpoint_id: str = Field(pattern=ENDPOINT_ID_PATTERN)
    api_key: SecretStr | None = Field(default=None)
    api_url: str = Field(default=DEFAULT_API_URL)
    execution_timeout_s: int = Field(default=DEFAULT_EXECUTION_TIMEOUT_S, ge=5)
    ttl_s: int = Field(default=DEFAULT_TTL_S, ge=10)
    poll_interval_s: float = Field(default=DEFAULT_POLL_INTERVAL_S, gt=0)
    request_timeout_s: float = Field(default=REQUEST_TIMEOUT_S, gt=0)

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
        description=f"Seconds between status polls (default {DEFAULT_POLL_INTERVAL_S}); after a failed poll the "
                    f"delay doubles, up to {MAX_POLL_BACKOFF_S:g} s.")
    request_timeout_s: float = Field(
        default=REQUEST_TIMEOUT_S, gt=0,
        description=f"Seconds to wait for each RunPod API answer (default {REQUEST_TIMEOUT_S:g}); a status poll "
                    "that times out is retried.")


class RunPodWorkerResult(BaseWorkerResult):
    """The RunPod job id and the exit status its outcome maps to."""


class RunPodWorker(BaseWorker[RunPodJobConfiguration, RunPodVariables, RunPodWorkerResult]):
    type = "runpod"
    job_configuration = RunPodJobConfiguration
    job_configuration_variables = RunPodVariables
    _description = "Runs each flow run as a job on a RunPod serverless endpoint (GPU, scaling from zero)."
    _display_name = "RunPod"

    async def run(self, flow_run: FlowRun, configuration: RunPodJobConfiguration,
                  task_status: anyio.abc.TaskStatus[int] | None = None) -> RunPodWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        async with _client(configuration) as client:
            job_id = await _submit(client, configuration)
            logger.info("Submitted to RunPod endpoint %s as job %s", configuration.endpoint_id, job_id)
            if task_status is not None:
                # Prefect keeps the value as the run's infrastructure id; RunPod's is a string.
                task_status.started(job_id)  # type: ignore[arg-type]
            status, cancelled_here = await self._wait(client, configuration, job_id, flow_run, logger)
        if cancelled_here:
            current = await self.client.read_flow_run(flow_run.id)
            if current.state is not None and current.state.is_cancelling():  # it never started: close it here
                await self._mark_flow_run_as_cancelled(current, state_updates={
                    "message": f"Cancelled in Prefect; RunPod job {job_id} cancelled."})
            logger.info("RunPod job %s cancelled with its flow run", job_id)
            return RunPodWorkerResult(identifier=job_id, status_code=0)
        code, end = _outcome(job_id, status, configuration)
        if end is not None:  # the flow run never got to report its end: say why it stopped
            await self._propose_end(flow_run, end)
        return RunPodWorkerResult(identifier=job_id, status_code=code)

    async def _propose_end(self, flow_run: FlowRun, end: State) -> None:
        """Give the flow run the end it could not report, unless it has one already."""
        if end.is_crashed():
            await self._propose_crashed_state(flow_run, end.message or "")
            return
        try:
            await propose_state(self.client, end, flow_run_id=flow_run.id)
        except Abort:  # it had already ended
            return
        self.get_flow_run_logger(flow_run).info("Reported flow run '%s' as failed: %s", flow_run.id, end.message)

    async def _wait(self, client: httpx.AsyncClient, configuration: RunPodJobConfiguration, job_id: str,
                    flow_run: FlowRun, logger: LoggerAdapter[Any]) -> tuple[dict[str, Any], bool]:
        """Poll until the job ends; cancel it once its flow run is cancelled in Prefect.

        Returns the final status and whether this worker cancelled the job. Prefect itself only cancels
        runs that never started, and only with PREFECT_WORKER_ENABLE_CANCELLATION, so the worker watches.
        A failed poll is never the end: the job runs (and bills) on, and only this worker maps its outcome.
        """
        cancelled_here = False
        delay = configuration.poll_interval_s
        while True:
            try:
                status = await _poll(client, configuration, job_id)
            except TransientPollError as exc:
                delay = backoff(delay, configuration.poll_interval_s)
                logger.warning("Could not read the status of RunPod job %s (%s); still following it, next poll "
                               "in %.1f s", job_id, exc, delay)
                await anyio.sleep(delay)
                continue
            delay = configuration.poll_interval_s
            if status["status"] in TERMINAL:
                return status, cancelled_here and status["status"] == "CANCELLED"
            if not cancelled_here and await self._cancel_requested(flow_run):
                cancelled_here = await _cancel(client, configuration, job_id, logger)
            await anyio.sleep(delay)

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
    return httpx.AsyncClient(base_url=configuration.api_url.rstrip("/"), timeout=configuration.request_timeout_s,
                             headers={"Authorization": f"Bearer {configuration.key()}"})


async def _submit(client: httpx.AsyncClient, configuration: RunPodJobConfiguration) -> str:
    """`/run` once: a retried submission could start the job twice, so a fault here fails the submission."""
    response = await client.post(f"/{configuration.endpoint_id}/run", json={
        "input": {"command": configuration.command,
                  "env": {k: v for k, v in configuration.env.items() if v is not None}},
        "policy": {"executionTimeout": configuration.execution_timeout_s * 1000, "ttl": configuration.ttl_s * 1000},
    })
    _raise_for_status(response, configuration.endpoint_id)
    try:
        return str(response.json()["id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunPodError(f"RunPod answered /run on endpoint '{configuration.endpoint_id}' without a job id: "
                          f"{_excerpt(response.text)}") from exc


async def _poll(client: httpx.AsyncClient, configuration: RunPodJobConfiguration, job_id: str) -> dict[str, Any]:
    """One `/status` call: the job's status, or TransientPollError for a fault worth polling again after."""
    try:
        response = await client.get(f"/{configuration.endpoint_id}/status/{job_id}")
    except httpx.TimeoutException as exc:
        raise TransientPollError(f"no answer in {configuration.request_timeout_s:g} s") from exc
    except (httpx.TransportError, httpx.DecodingError) as exc:  # refused, reset, dropped or garbled
        raise TransientPollError(f"{type(exc).__name__}: {exc}") from exc
    if _transient(response.status_code):
        raise TransientPollError(f"HTTP {response.status_code}")
    _raise_for_status(response, configuration.endpoint_id, job_id)
    try:
        status = response.json()
    except ValueError as exc:
        raise TransientPollError(f"a body that is not JSON: {_excerpt(response.text)}") from exc
    if not isinstance(status, dict) or not isinstance(status.get("status"), str):
        raise TransientPollError(f"a body without a job status: {_excerpt(response.text)}")
    return status


async def _cancel(client: httpx.AsyncClient, configuration: RunPodJobConfiguration, job_id: str,
                  logger: LoggerAdapter[Any]) -> bool:
    """Ask RunPod to cancel the job; False when that failed in a way worth trying again at the next poll."""
    try:
        response = await client.post(f"/{configuration.endpoint_id}/cancel/{job_id}")
    except (httpx.TransportError, httpx.DecodingError) as exc:
        logger.warning("Could not cancel RunPod job %s (%s); trying again", job_id, type(exc).__name__)
        return False
    if _transient(response.status_code):
        logger.warning("Could not cancel RunPod job %s (HTTP %d); trying again", job_id, response.status_code)
        return False
    _raise_for_status(response, configuration.endpoint_id, job_id)
    return True


def _outcome(job_id: str, status: dict[str, Any],
             configuration: RunPodJobConfiguration) -> tuple[int, State | None]:
    """The exit status a finished job gives its flow run, and the end to give the run when it could not say.

    Crashed when RunPod lost the job (FAILED, TIMED_OUT: another try may pass, and the job's GPU task makes
    one); Failed when the handler answered without running the flow run (it refused the command or env, or
    is not this project's handler): the same request would be refused again, as a submission is.
    """
    state = status["status"]
    if state != "COMPLETED":
        timeout = f"execution timeout of {configuration.execution_timeout_s} s" if state == "TIMED_OUT" else None
        return TERMINAL[state], Crashed(message=f"RunPod job {job_id} {state}: "
                                                f"{status.get('error') or timeout or 'no detail'}")
    output = status.get("output")
    exit_code = output.get("exit_code") if isinstance(output, dict) else None
    if isinstance(exit_code, int) and not isinstance(exit_code, bool):
        return exit_code, None
    error = output.get("error") if isinstance(output, dict) else None
    reason = (f"the handler refused it: {error}" if error else
              f"the handler returned no exit code ({_excerpt(json.dumps(output))}); check that the endpoint runs "
              "this project's image (handler.py)")
    return 1, Failed(message=f"RunPod job {job_id} COMPLETED without running the flow run: {reason}")


def backoff(delay: float, poll_interval_s: float) -> float:
    """The delay after one more failed poll: doubled, at most MAX_POLL_BACKOFF_S, never under the interval.

    Example:
        >>> backoff(0.5, 0.5), backoff(16.0, 0.5), backoff(30.0, 0.5), backoff(60.0, 60.0)
        (1.0, 30.0, 30.0, 60.0)
    """
    return max(poll_interval_s, min(delay * 2, MAX_POLL_BACKOFF_S))


def _transient(status_code: int) -> bool:
    return status_code in (408, 429) or status_code >= 500


def _excerpt(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _raise_for_status(response: httpx.Response, endpoint_id: str, job_id: str | None = None) -> None:
    code = response.status_code
    if code in (401, 403):
        raise RunPodError(f"RunPod refused the API key (HTTP {code}) for endpoint '{endpoint_id}'. Check the "
                          "pool's `api_key` job variable or RUNPOD_API_KEY on the worker.")
    if code == 404 and job_id is not None:
        raise RunPodError(f"RunPod does not know job {job_id} on endpoint '{endpoint_id}' (HTTP 404): the job "
                          "expired (`ttl_s`) or the endpoint was deleted. The flow run keeps the last state it "
                          "reported.")
    if code == 404:
        raise RunPodError(f"RunPod endpoint '{endpoint_id}' not found. Check the pool's `endpoint_id`.")
    if not response.is_success:
        raise RunPodError(f"RunPod answered HTTP {code} to {response.request.method} {response.request.url.path} "
                          f"on endpoint '{endpoint_id}': {_excerpt(response.text)}")
