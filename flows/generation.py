"""The GPU generation flows: one diffusers generation each, run on the `factory-gpu` RunPod pool.

The job flow submits them to the pool (`run_on_gpu`, which `tasks/media.py` is handed); a `runpod` worker
sends each one to the RunPod endpoint, whose handler.py executes the flow run from its bundle on a GPU. They are
separate flows per kind so each can be bound to its own endpoint (a 24 GB card for images, 48 GB+
for video) with `.with_options(job_variables={"endpoint_id": ...})` or a pool per kind
(FACTORY_GPU_POOL).
"""

from __future__ import annotations

import asyncio
import math
import time
from decimal import Decimal
from uuid import UUID

from prefect import flow, get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelled, Cancelling

from factory.errors import ProviderRequestError, TransientProviderError
from factory.media import MediaKind, MediaRequest, MediaResult, make_media_generator
from factory.models import Usage
from factory.settings import get_settings
from workers.decorators import runpod

STATE_POLL_S = 1.0


async def _generate(request: MediaRequest) -> MediaResult:
    generator = make_media_generator("diffusers", None)
    return await generator.generate(request, timeout_s=get_settings().gpu_timeout_s)


@runpod(work_pool=get_settings().gpu_pool)
@flow(name="factory-gpu-image", persist_result=True)
async def generate_image_gpu(request: MediaRequest) -> MediaResult:
    """Generate one image with a diffusers pipeline on this worker's GPU."""
    return await _generate(request)


@runpod(work_pool=get_settings().gpu_pool)
@flow(name="factory-gpu-audio", persist_result=True)
async def generate_audio_gpu(request: MediaRequest) -> MediaResult:
    """Generate one audio clip with a diffusers audio pipeline on this worker's GPU."""
    return await _generate(request)


@runpod(work_pool=get_settings().gpu_pool)
@flow(name="factory-gpu-video", persist_result=True)
async def generate_video_gpu(request: MediaRequest) -> MediaResult:
    """Generate one video with a diffusers video pipeline on this worker's GPU."""
    return await _generate(request)


GPU_FLOWS = {MediaKind.IMAGE: generate_image_gpu, MediaKind.AUDIO: generate_audio_gpu,
             MediaKind.VIDEO: generate_video_gpu}


async def run_on_gpu(request: MediaRequest, timeout_s: float) -> MediaResult:
    """Run the GPU flow for `request` as a child flow run on the GPU pool and wait for its result.

    RunPod bills a job's whole execution, finished or not, rounded up to the second: a completed run's own start
    and end times, else the time since it was submitted (an upper bound of what RunPod can have billed).

    Raises:
        ProviderRequestError: the run Failed: the flow itself raised (a missing model folder, a bad request) or
            the pool refused it (a RunPod key or endpoint refused); trying again cannot help.
        TransientProviderError: the run Crashed (RunPod FAILED / TIMED_OUT, a lost worker) or did not finish in
            time (it is cancelled); a new run is worth trying.
    """
    submitted = time.monotonic()
    # Submission is synchronous in Prefect (bundle, upload, create the run): keep it off the event loop.
    future = await asyncio.to_thread(GPU_FLOWS[request.kind].submit_to_work_pool, request)
    try:
        run = await asyncio.wait_for(_finished(future.flow_run_id), timeout_s)
    except (TimeoutError, asyncio.CancelledError) as exc:
        await asyncio.shield(_cancel(future.flow_run_id))
        if isinstance(exc, TimeoutError):
            raise TransientProviderError(
                request.model, f"GPU flow run {future.flow_run_id} did not finish within {timeout_s:.0f} s; it was "
                               f"cancelled", billed=_gpu_usage(None, submitted)) from exc
        raise
    state = run.state
    assert state is not None  # _finished returns a run in a final state
    # A run that never got to record its own times (a RunPod job that failed) is bounded by the wall time.
    billed = _gpu_usage(run if state.is_completed() else None, submitted)
    if state.is_failed():
        raise ProviderRequestError(request.model, f"GPU flow run {future.flow_run_id} failed: "
                                                  f"{state.message or 'no detail'}", billed=billed)
    if not state.is_completed():
        raise TransientProviderError(request.model, f"GPU flow run {future.flow_run_id} ended "
                                                    f"{state.type.value}: {state.message or 'no detail'}",
                                     billed=billed)
    result: MediaResult = await state.aresult()
    return result.model_copy(update={"usage": result.usage.model_copy(
        update={"gpu_seconds": max(billed.gpu_seconds, result.usage.gpu_seconds)})})


def _gpu_usage(run: FlowRun | None, submitted: float) -> Usage:
    if run is not None and run.start_time is not None and run.end_time is not None:
        ran = (run.end_time - run.start_time).total_seconds()
    else:
        ran = time.monotonic() - submitted
    return Usage(gpu_seconds=Decimal(math.ceil(ran)))


async def _finished(flow_run_id: UUID) -> FlowRun:
    """The flow run once it is in a final state (with its start and end times)."""
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            await asyncio.sleep(STATE_POLL_S)


async def cancel_gpu_children(parent_flow_run_id: UUID) -> None:
    """Cancel the GPU runs a job left behind when it was cancelled or crashed."""
    async with get_client() as client:
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id])))
        for run in children:
            await _cancel_run(client, run)


async def _cancel(flow_run_id: UUID) -> None:
    async with get_client() as client:
        await _cancel_run(client, await client.read_flow_run(flow_run_id))


async def _cancel_run(client: PrefectClient, run: FlowRun) -> None:
    """Cancel an unfinished child run: at once if no worker took it yet, else through its worker (which cancels
    the RunPod job)."""
    if run.state is None or run.state.is_final():
        return
    waiting = run.state.type in (StateType.SCHEDULED, StateType.PENDING)
    await client.set_flow_run_state(run.id, Cancelled() if waiting else Cancelling(), force=True)
