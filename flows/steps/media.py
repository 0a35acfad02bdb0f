"""The executor step of an IMAGE, AUDIO or VIDEO job: generate, store, and prepare what the evaluator sees.

The media model sees only a text prompt: the seed first, then the evaluator's `feedback_for_executor`,
which for media is the complete revised prompt. The evaluator is shown the media itself: the image,
evenly sampled video frames, or the audio's transcript, with facts measured from the file.
"""

from __future__ import annotations

import asyncio
import base64

from factory.artifacts import MEDIA_EXTENSIONS
from factory.media import GPU_PROVIDERS, MediaKind, MediaRequest
from factory.media.base import MediaFacts
from factory.models import Event, IterationOutput
from factory.preflight import JobPlan
from factory.prompts import media_description
from factory.settings import FactorySettings
from flows.generation import run_on_gpu
from flows.steps.common import Made, PaidCalls
from tasks.media import MediaCallResult, TranscriptCallResult, generate_media, media_usage_bound, transcribe_audio
from tasks.store import store_artifact


def media_prompt(seed: str, feedback: str | None) -> str:
    """The seed, until the evaluator has written the complete revised prompt as its feedback."""
    return (feedback or "").strip() or seed


async def make_media(calls: PaidCalls, plan: JobPlan, settings: FactorySettings, n: int,
                     feedback: str | None) -> Made:
    """Generate, store and prepare one media artifact from the seed or the evaluator's revised prompt."""
    from factory.media.probe import facts_text, thumbnail  # PyAV, Pillow, NumPy: media jobs only

    kind = plan.media_kind
    assert kind is not None, "a media step runs only in a media job"
    request = MediaRequest(kind=kind, model=plan.executor.api_name, prompt=media_prompt(plan.job.seed, feedback),
                           width=settings.media_width, height=settings.media_height,
                           duration_s=settings.media_seconds)
    worst = plan.executor.price.cost(await media_usage_bound(plan.executor.provider, request))
    on_pool = plan.executor.provider in GPU_PROVIDERS and not settings.gpu_local
    generated: MediaCallResult = await calls.call(generate_media, Event.EXECUTOR_CALL, n, "executor",
                                                 plan.executor, request, worst, rejects=plan.artifact_dir,
                                                 gpu=run_on_gpu if on_pool else None)
    media, facts, images = generated.result, generated.facts, generated.shown
    extension = MEDIA_EXTENSIONS.get(media.media_type, ".bin")
    location = plan.artifact_dir.child(f"iteration-{n:02d}{extension}")
    digest = await store_artifact(location, media.data)
    if images:  # the image, or a video's first frame, in the UI too
        first = images[0]
        calls.report.picture(n, await asyncio.to_thread(thumbnail, base64.b64decode(first.data), first.media_type))
    transcript = None
    if kind is MediaKind.AUDIO:
        transcript = (await _transcribe(calls, plan, n, request, generated, facts)).transcript.text
    shown = media_description(kind, request.prompt, facts_text(facts), transcript, len(images))
    output = IterationOutput(
        artifact_ref=location.ref, artifact_hash=digest, executor_model=media.model,
        cost_usd=float(sum(c.cost_usd for c in generated.calls)), tokens_used=generated.call.usage.total,
        metadata={"prompt": request.prompt, "media_type": media.media_type, "usage_known": generated.call.usage_known,
                  **facts.model_dump(exclude_none=True), **generated.call.usage.model_dump(mode="json")})
    return Made(shown, media.data, extension, location, output, images)


async def _transcribe(calls: PaidCalls, plan: JobPlan, n: int, request: MediaRequest, generated: MediaCallResult,
                      facts: MediaFacts) -> TranscriptCallResult:
    from factory.media.openai import OpenAIMediaGenerator  # the SDK costs ~1 s to import: audio jobs only

    transcriber = plan.transcriber
    assert transcriber is not None, "planned for every audio job"
    worst = transcriber.price.cost(OpenAIMediaGenerator.transcription_bound(facts.duration_s or 0))
    transcribed: TranscriptCallResult = await calls.call(transcribe_audio, Event.EXECUTOR_CALL, n, "transcriber",
                                                       transcriber, request, worst, audio=generated.result)
    return transcribed
