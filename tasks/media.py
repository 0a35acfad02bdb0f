"""`generate_media` and `transcribe_audio`: one paid media call each, cached and retried like the
chat calls. GPU models run as their own flow run on the GPU pool; API models run here."""

from __future__ import annotations

import asyncio
import math
import time
from decimal import Decimal
from typing import TYPE_CHECKING, cast
from uuid import UUID

from prefect import get_client, task
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Cancelled, Cancelling
from pydantic import Field

from factory.artifacts import MEDIA_EXTENSIONS
from factory.errors import ProviderRequestError, StorageError, StorageSpooled, TransientProviderError
from factory.media import GPU_PROVIDERS, MediaRequest, MediaResult, make_media_generator
from factory.media.base import MediaFacts, Transcript
from factory.models import CallRecord, StrictModel, Usage
from factory.providers import ImagePart
from factory.settings import get_settings
from factory.storage import Location, get_storage
from tasks.calls import call_cache_key, client_for
from tasks.retry import Allowance, Call, with_retries

if TYPE_CHECKING:  # the OpenAI SDK is imported only by jobs that use it
    from factory.media.openai import OpenAIMediaGenerator

STATE_POLL_S = 1.0


class MediaCallResult(StrictModel):
    result: MediaResult
    facts: MediaFacts
    shown: list[ImagePart] = Field(description="What the evaluator is shown: the image, or sampled video frames.")
    calls: list[CallRecord] = Field(min_length=1, description="Every billed attempt, the one that made it last.")

    @property
    def call(self) -> CallRecord:
        return self.calls[-1]


class TranscriptCallResult(StrictModel):
    transcript: Transcript
    calls: list[CallRecord] = Field(min_length=1)

    @property
    def call(self) -> CallRecord:
        return self.calls[-1]


@task(name="generate_media", cache_key_fn=call_cache_key, persist_result=True,
      task_run_name="generate-{job_id}-{iteration}")
async def generate_media(job_id: str, iteration: int, role: str, provider: str, request: MediaRequest,
                         allowance: Allowance, rejects: Location) -> MediaCallResult:
    """Make iteration `iteration`'s media: on the GPU pool for GPU models (here, where this process has the
    GPU: FACTORY_GPU_LOCAL), else through the provider's API. Media that does not decode is a provider fault:
    it is charged, kept in `rejects` for inspection and made again; only media the evaluator can be shown is
    returned (and so cached).

    Returns:
        The media, what the evaluator is shown of it, and the CallRecords of its billed attempts.
    """
    from factory.media.probe import UnreadableMedia, examine  # PyAV, Pillow, NumPy: media jobs only

    settings = get_settings()
    on_gpu = provider in GPU_PROVIDERS and not settings.gpu_local
    generator = None if on_gpu else await client_for(provider, make_media_generator)
    rejected = 0

    async def attempt(timeout_s: float) -> tuple[tuple[MediaResult, MediaFacts, list[ImagePart]], Usage | None]:
        nonlocal rejected
        made = await (run_on_gpu(request, timeout_s) if generator is None
                      else generator.generate(request, timeout_s=timeout_s))
        usage = made.usage if made.usage_known else None
        try:
            facts, shown = await asyncio.to_thread(examine, request.kind, made.data, made.media_type,
                                                   settings.video_frames)
        except UnreadableMedia as exc:
            rejected += 1
            name = f"iteration-{iteration:02d}-rejected-{rejected}{MEDIA_EXTENSIONS.get(made.media_type, '.bin')}"
            kept = await _keep(rejects.child(name), made.data)
            raise TransientProviderError(request.model, f"{exc} The bytes were kept at {kept}.", billed=usage,
                                         billed_unknown=True) from exc
        return (made, facts, shown), usage

    (made, facts, shown), records = await with_retries(attempt, Call(iteration, role, request.model), allowance,
                                                       bound_s=settings.gpu_timeout_s if on_gpu else None)
    return MediaCallResult(result=made, facts=facts, shown=shown, calls=records)


@task(name="transcribe_audio", cache_key_fn=call_cache_key, persist_result=True,
      task_run_name="transcribe-{job_id}-{iteration}")
async def transcribe_audio(job_id: str, iteration: int, role: str, provider: str, request: MediaRequest,
                           audio: MediaResult, allowance: Allowance) -> TranscriptCallResult:
    """Transcribe generated audio so the evaluator can judge what it says. `request` keys the cache."""
    client = cast("OpenAIMediaGenerator", await client_for(provider, make_media_generator))  # the one transcriber
    model = get_settings().transcription_model

    async def attempt(timeout_s: float) -> tuple[Transcript, Usage]:
        transcript = await client.transcribe(audio.data, audio.media_type, model=model, timeout_s=timeout_s)
        return transcript, transcript.usage

    transcript, records = await with_retries(attempt, Call(iteration, role, model), allowance)
    return TranscriptCallResult(transcript=transcript, calls=records)


async def media_usage_bound(provider: str, request: MediaRequest) -> Usage:
    """The most `request` can be billed for: a GPU run is bounded by how long it may run."""
    if provider in GPU_PROVIDERS:
        return Usage(gpu_seconds=Decimal(get_settings().gpu_timeout_s))
    generator = await client_for(provider, make_media_generator)
    return generator.usage_bound(request)


async def _keep(location: Location, data: bytes) -> str:
    """Store rejected media where a person can look at it; say where it went."""
    try:
        await get_storage().write(location, data)
    except StorageSpooled as exc:
        return str(exc.spool_path)
    except StorageError as exc:
        return f"nowhere ({exc})"
    return location.ref


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
    from flows.generation import GPU_FLOWS  # flows import tasks: resolved at call time

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
