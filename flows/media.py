"""The executor step of an IMAGE, AUDIO or VIDEO job: generate, store, and prepare what the evaluator sees.

The media model sees only a text prompt: the seed first, then the evaluator's `feedback_for_executor`,
which for media is the complete revised prompt. The evaluator is shown the media itself: the image,
evenly sampled video frames, or the audio's transcript, with facts measured from the file.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from factory.artifacts import MEDIA_EXTENSIONS
from factory.media import MediaKind, MediaRequest
from factory.models import Event, IterationOutput
from factory.prompts import media_description
from factory.providers import ImagePart
from factory.storage import Location
from tasks.media import MediaCallResult, TranscriptCallResult, media_usage_bound
from tasks.store import store_artifact

if TYPE_CHECKING:
    from factory.media.probe import MediaFacts
    from flows.loop import Iteration, JobRun


@dataclass
class Made:
    """What the executor step produced: what the evaluator reads, what is stored, and its cost."""

    shown: str
    data: bytes
    extension: str
    location: Location
    output: IterationOutput
    cost: Decimal
    images: list[ImagePart] = field(default_factory=list)


def media_prompt(seed: str, previous: Iteration | None) -> str:
    revised = previous.verdict.feedback_for_executor.strip() if previous else ""
    return revised or seed


async def make_media(run: JobRun, n: int, previous: Iteration | None) -> Made:
    from factory.media.probe import facts_text, probe, thumbnail  # PyAV, Pillow, NumPy: media jobs only

    plan = run.plan
    kind = plan.media_kind
    settings = run.settings
    request = MediaRequest(kind=kind, model=plan.executor.api_name, prompt=media_prompt(plan.job.seed, previous),
                           width=settings.media_width, height=settings.media_height,
                           duration_s=settings.media_seconds)
    worst = plan.executor.price.cost(await media_usage_bound(plan.executor.provider, request))
    generated: MediaCallResult = await run.call(run.generate_media, Event.EXECUTOR_CALL, n, "executor",
                                                 plan.executor, request, worst)
    media = generated.result
    extension = MEDIA_EXTENSIONS.get(media.media_type, ".bin")
    location = plan.artifact_dir.child(f"iteration-{n:02d}{extension}")
    digest = await store_artifact(location, media.data)
    facts = await asyncio.to_thread(probe, media.data, media.media_type)
    images = await asyncio.to_thread(_images, kind, media.data, media.media_type, settings.video_frames)
    if images:  # the image, or a video's first frame, in the UI too
        first = images[0]
        run.report.picture(n, await asyncio.to_thread(thumbnail, base64.b64decode(first.data), first.media_type))
    cost, transcript = generated.call.cost_usd, None
    if kind is MediaKind.AUDIO:
        heard = await _transcribe(run, n, request, generated, facts)
        cost, transcript = cost + heard.call.cost_usd, heard.transcript.text
    shown = media_description(kind, request.prompt, facts_text(facts), transcript, len(images))
    output = IterationOutput(
        artifact_ref=location.ref, artifact_hash=digest, executor_model=media.model,
        cost_usd=float(generated.call.cost_usd), tokens_used=generated.call.usage.total,
        metadata={"prompt": request.prompt, "media_type": media.media_type,
                  **facts.model_dump(exclude_none=True), **generated.call.usage.model_dump(mode="json")})
    return Made(shown, media.data, extension, location, output, cost, images)


def _images(kind: MediaKind, data: bytes, media_type: str, frames: int) -> list[ImagePart]:
    from factory.media.probe import evaluator_image, sample_frames

    if kind is MediaKind.IMAGE:
        shown_type, shown = evaluator_image(data, media_type)
        return [ImagePart(media_type=shown_type, data=base64.b64encode(shown).decode())]
    if kind is MediaKind.VIDEO:
        return [ImagePart(media_type="image/png", data=base64.b64encode(frame).decode())
                for frame in sample_frames(data, frames)]
    return []


async def _transcribe(run: JobRun, n: int, request: MediaRequest, generated: MediaCallResult,
                      facts: MediaFacts) -> TranscriptCallResult:
    from factory.media.openai import OpenAIMediaGenerator  # the SDK costs ~1 s to import: audio jobs only

    transcriber = run.plan.transcriber
    worst = transcriber.price.cost(OpenAIMediaGenerator.transcription_bound(facts.duration_s or 0))
    return await run.call(run.transcribe, Event.EXECUTOR_CALL, n, "transcriber", transcriber, request, worst,
                           audio=generated.result)
