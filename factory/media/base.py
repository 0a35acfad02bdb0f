"""The media generation interface: one request in, the media's bytes and what it was billed for out.

Every media generator, API-backed (fal, OpenAI images and speech, ElevenLabs) or GPU-local
(diffusers, run on the `factory-gpu` RunPod pool), implements `MediaGenerator.generate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import StrEnum

from pydantic import Field

from factory.models import FunctionType, StrictModel, Usage


class MediaKind(StrEnum):
    """The kind of media a job generates, from its function (`MEDIA_FUNCTIONS`)."""

    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"


MEDIA_FUNCTIONS: dict[FunctionType, MediaKind] = {
    FunctionType.IMAGE_GENERATION: MediaKind.IMAGE,
    FunctionType.AUDIO_GENERATION: MediaKind.AUDIO,
    FunctionType.VIDEO_GENERATION: MediaKind.VIDEO,
}


class MediaRequest(StrictModel):
    """What to ask a media model. Everything here changes the output, so all of it keys the cache."""

    kind: MediaKind
    model: str = Field(description="The name the provider's API expects (routing prefix removed).")
    prompt: str = Field(min_length=1)
    width: int = Field(default=1024, ge=64, le=4096)
    height: int = Field(default=1024, ge=64, le=4096)
    duration_s: int = Field(default=5, ge=1, le=60, description="Video or music length.")
    voice: str | None = Field(default=None, description="Speech voice (OpenAI voice name, ElevenLabs voice id).")
    seed: int | None = None


class MediaResult(StrictModel):
    """Generated media and the units the provider billed for it."""

    data: bytes
    media_type: str = Field(description="MIME type, e.g. image/png, audio/mpeg, video/mp4.")
    usage: Usage
    usage_known: bool = Field(default=True, description="False: the provider did not say, `usage` is its bound.")
    model: str


class Transcript(StrictModel):
    """What speech recognition heard in generated audio, and what it was billed for."""

    text: str
    usage: Usage


class MediaFacts(StrictModel):
    """Measured facts about one piece of media; fields that do not apply to its kind are None."""

    media_type: str
    format: str
    size_bytes: int
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    fps: float | None = None
    frame_count: int | None = None
    sample_rate: int | None = None
    channels: int | None = None
    loudness_dbfs: float | None = None
    peak_dbfs: float | None = None


class MediaGenerator(ABC):
    """A media provider: one async call, typed in and out."""

    name: str

    @abstractmethod
    async def generate(self, request: MediaRequest, *, timeout_s: float) -> MediaResult:
        """Generate one piece of media.

        Raises:
            TransientProviderError: worth retrying (429, 5xx, timeouts, garbled replies).
            ProviderAuthError, ProviderRequestError: not worth retrying.
        """

    @abstractmethod
    def usage_bound(self, request: MediaRequest) -> Usage:
        """The most this request can be billed for, unit by unit: priced, it is the call's worst case."""

    async def aclose(self) -> None:  # noqa: B027 - a default, not abstract: most hold nothing to close
        """Release the generator's connections (a no-op where it holds none)."""
