"""`generate_media` and `transcribe_audio`: one paid media call each, cached and retried like the
chat calls. GPU models run as their own flow run on the GPU pool; API models run here."""

from __future__ import annotations

import asyncio
import math
import time
from decimal import Decimal

from prefect import get_client, task
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelled, Cancelling

from factory.errors import TransientProviderError
from factory.media import GPU_PROVIDERS, MediaRequest, MediaResult, make_media_generator
from factory.media.base import Transcript
from factory.models import CallRecord, StrictModel, Usage
from factory.pricing import Price
from factory.settings import get_settings
from tasks.calls import call_cache_key, client_for, time_left

STATE_POLL_S = 1.0


class MediaCallResult(StrictModel):
    result: MediaResult
    call: CallRecord


class TranscriptCallResult(StrictModel):
    transcript: Transcript
    call: CallRecord


@task(name="generate_media", cache_key_fn=call_cache_key, persist_result=True,
      task_run_name="generate-{job_id}-{iteration}")
async def generate_media(job_id: str, iteration: int, role: str, provider: str, request: MediaRequest,
                         price: Price, deadline: float) -> MediaCallResult:
    """Make iteration `iteration`'s media: on the GPU pool for GPU models (here, where this process has the
    GPU: FACTORY_GPU_LOCAL), else through the provider's API.

    Returns:
        The media and its CallRecord (units billed, exact cost, duration).
    """
    started = time.perf_counter()
    if provider in GPU_PROVIDERS and not get_settings().gpu_local:
        result = await run_on_gpu(request, time_left(deadline, role, get_settings().gpu_timeout_s))
    else:
        generator = await client_for(provider, make_media_generator)
        result = await generator.generate(request, timeout_s=time_left(deadline, role))
    record = CallRecord(role=role, model=request.model, usage=result.usage, cost_usd=price.cost(result.usage),
                        duration_ms=int((time.perf_counter() - started) * 1000))
    return MediaCallResult(result=result, call=record)


@task(name="transcribe_audio", cache_key_fn=call_cache_key, persist_result=True,
      task_run_name="transcribe-{job_id}-{iteration}")
async def transcribe_audio(job_id: str, iteration: int, role: str, provider: str, request: MediaRequest,
                           audio: MediaResult, price: Price, deadline: float) -> TranscriptCallResult:
    """Transcribe generated audio so the evaluator can judge what it says. `request` keys the cache."""
    started = time.perf_counter()
    client = await client_for(provider, make_media_generator)  # OpenAI: the one transcriber
    model = get_settings().transcription_model
    transcript = await client.transcribe(audio.data, audio.media_type, model=model,
                                         timeout_s=time_left(deadline, role))
    record = CallRecord(role=role, model=model, usage=transcript.usage, cost_usd=price.cost(transcript.usage),
                        duration_ms=int((time.perf_counter() - started) * 1000))
    return TranscriptCallResult(transcript=transcript, call=record)


async def media_usage_bound(provider: str, request: MediaRequest) -> Usage:
    """The most `request` can be billed for: a GPU run is bounded by how long it may run."""
    if provider in GPU_PROVIDERS:
        return Usage(gpu_seconds=Decimal(get_settings().gpu_timeout_s))
    generator = await client_for(provider, make_media_generator)
    return generator.usage_bound(request)


async def run_on_gpu(request: MediaRequest, timeout_s: float) -> MediaResult:
    """Run the GPU flow for `request` as a child flow run on the GPU pool and wait for its result.

    Raises:
        TransientProviderError: the run failed, crashed (RunPod FAILED / TIMED_OUT) or did not finish in time;
            the task's retries submit a new run.
    """
    from flows.generation import GPU_FLOWS  # flows import tasks: resolved at call time

    # Submission is synchronous in Prefect (bundle, upload, create the run): keep it off the event loop.
    future = await asyncio.to_thread(GPU_FLOWS[request.kind].submit_to_work_pool, request)
    try:
        run = await asyncio.wait_for(_finished(future.flow_run_id), timeout_s)
    except (TimeoutError, asyncio.CancelledError) as exc:
        await asyncio.shield(_cancel(future.flow_run_id))
        if isinstance(exc, TimeoutError):
            raise TransientProviderError(request.model, f"GPU flow run {future.flow_run_id} did not finish "
                                                        f"within {timeout_s:.0f} s; it was cancelled") from exc
        raise
    state = run.state
    if not state.is_completed():
        raise TransientProviderError(request.model, f"GPU flow run {future.flow_run_id} ended "
                                                    f"{state.type.value}: {state.message or 'no detail'}")
    result: MediaResult = await state.aresult()
    # RunPod bills the whole execution, rounded up to the second, not just the pipeline call.
    if run.start_time is not None and run.end_time is not None:
        ran = Decimal(math.ceil((run.end_time - run.start_time).total_seconds()))
        result = result.model_copy(update={"usage": result.usage.model_copy(
            update={"gpu_seconds": max(ran, result.usage.gpu_seconds)})})
    return result


async def _finished(flow_run_id) -> FlowRun:
    """The flow run once it is in a final state (with its start and end times)."""
    async with get_client() as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            await asyncio.sleep(STATE_POLL_S)


async def cancel_gpu_children(parent_flow_run_id) -> None:
    """Cancel the GPU runs a job left behind when it was cancelled or crashed."""
    async with get_client() as client:
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id])))
        for run in children:
            await _cancel_run(client, run)


async def _cancel(flow_run_id) -> None:
    async with get_client() as client:
        await _cancel_run(client, await client.read_flow_run(flow_run_id))


async def _cancel_run(client: PrefectClient, run: FlowRun) -> None:
    """Cancel an unfinished child run: at once if no worker took it yet, else through its worker (which cancels
    the RunPod job)."""
    if run.state is None or run.state.is_final():
        return
    waiting = run.state.type in (StateType.SCHEDULED, StateType.PENDING)
    await client.set_flow_run_state(run.id, Cancelled() if waiting else Cancelling(), force=True)
