"""`generate_media` and `transcribe_audio`: one paid media call each, cached and retried like the
chat calls. GPU models run as their own flow run on the GPU pool, through the runner the job flow
passes in (flows/generation.py); API models, and GPU models where this process has the GPU, run here."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, cast

from prefect import task
from pydantic import Field

from factory.artifacts import MEDIA_EXTENSIONS
from factory.errors import StorageError, StorageSpooled, TransientProviderError
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

# Runs one media request on the GPU pool within a time limit: flows/generation.py's run_on_gpu.
GpuRun = Callable[[MediaRequest, float], Awaitable[MediaResult]]


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
                         allowance: Allowance, rejects: Location, gpu: GpuRun | None = None) -> MediaCallResult:
    """Make iteration `iteration`'s media: through `gpu` where given (a GPU model on the GPU pool), else here
    (the provider's API, or a GPU model on this process's own GPU: FACTORY_GPU_LOCAL). Media that does not
    decode is a provider fault: it is charged, kept in `rejects` for inspection and made again; only media the
    evaluator can be shown is returned (and so cached).

    Returns:
        The media, what the evaluator is shown of it, and the CallRecords of its billed attempts.
    """
    from factory.media.probe import UnreadableMedia, examine  # PyAV, Pillow, NumPy: media jobs only

    settings = get_settings()
    generator = None if gpu is not None else await client_for(provider, make_media_generator)
    rejected = 0

    async def attempt(timeout_s: float) -> tuple[tuple[MediaResult, MediaFacts, list[ImagePart]], Usage | None]:
        nonlocal rejected
        made = await (generator.generate(request, timeout_s=timeout_s) if generator is not None
                      else cast("GpuRun", gpu)(request, timeout_s))
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

    call = Call(iteration, role, request.model, provider)
    (made, facts, shown), records = await with_retries(attempt, call, allowance,
                                                       bound_s=settings.gpu_timeout_s if gpu else None)
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

    transcript, records = await with_retries(attempt, Call(iteration, role, model, provider), allowance)
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
