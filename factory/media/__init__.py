"""Media generation, chosen by model name, and what the evaluator is shown of the result.

`fal:<endpoint>` -> fal (e.g. `fal:fal-ai/flux/schnell`); `gpt-image-*`, `dall-e-*` -> OpenAI images;
`tts-*`, `gpt-*-tts` -> OpenAI speech; `elevenlabs:<model_id>` -> ElevenLabs text-to-speech;
`diffusers:<model path>` -> a diffusers pipeline on a GPU, run as a flow on the `factory-gpu` RunPod pool.
"""

from __future__ import annotations

import re

from pydantic import SecretStr

from factory.errors import ConfigurationError
from factory.media.base import MEDIA_FUNCTIONS, MediaGenerator, MediaKind, MediaRequest, MediaResult

__all__ = ["MEDIA_FUNCTIONS", "GPU_PROVIDERS", "MediaGenerator", "MediaKind", "MediaRequest", "MediaResult",
           "media_provider_name", "media_api_model", "make_media_generator", "not_chat"]

# Providers whose generation runs on the GPU pool rather than in the job's own process.
GPU_PROVIDERS = frozenset({"diffusers"})
_PREFIXED = ("fal", "elevenlabs", "diffusers")
_OPENAI = {MediaKind.IMAGE: re.compile(r"^(gpt-image-|dall-e-)"), MediaKind.AUDIO: re.compile(r"^(tts-|gpt-.*-tts)")}
EXAMPLES = {
    MediaKind.IMAGE: "'fal:fal-ai/flux/schnell', 'gpt-image-1' or 'diffusers:/models/<pipeline>'",
    MediaKind.AUDIO: "'tts-1', 'elevenlabs:eleven_multilingual_v2' or 'diffusers:/models/<pipeline>'",
    MediaKind.VIDEO: "'fal:fal-ai/kling-video/v4/text-to-video' or 'diffusers:/models/<pipeline>'",
}


# Models that make or hear media and cannot stand in a chat role (executor of text, evaluator), by what they are.
_NOT_CHAT = (
    (_OPENAI[MediaKind.IMAGE], "an image generation model"),
    (_OPENAI[MediaKind.AUDIO], "a speech model"),
    (re.compile(r"^(whisper-|gpt-.*-transcribe)"), "a transcription model"),
    (re.compile(r"^(gpt-realtime|gpt-.*-realtime)"), "a realtime (voice) model"),
    (re.compile(r"^(fal|elevenlabs|diffusers):"), "a media generation model"),
)


def not_chat(model: str) -> str | None:
    """What `model` is when it is a media model rather than a chat model (e.g. 'an image generation model')."""
    return next((what for pattern, what in _NOT_CHAT if pattern.match(model)), None)


def media_provider_name(model: str, kind: MediaKind, field: str = "executor_model") -> str:
    """`fal`, `openai`, `elevenlabs` or `diffusers` for a media model name.

    Raises:
        ConfigurationError: the name does not say which provider makes this kind of media.
    """
    prefix, sep, rest = model.partition(":")
    if sep and rest and prefix in _PREFIXED and not (prefix == "elevenlabs" and kind is not MediaKind.AUDIO):
        return prefix
    if kind in _OPENAI and _OPENAI[kind].match(model):
        return "openai"
    raise ConfigurationError(field, f"'{model}' makes no {kind.value} that this deployment knows of; use e.g. "
                                    f"{EXAMPLES[kind]}.")


def media_api_model(model: str) -> str:
    """The name the provider expects (the routing prefix removed)."""
    prefix, sep, rest = model.partition(":")
    return rest if sep and prefix in _PREFIXED else model


def make_media_generator(provider: str, api_key: SecretStr | None) -> MediaGenerator:
    """The generator for a provider `media_provider_name` returned, its SDK or pipeline imported only now."""
    # Imported on first use: the heavy ones (torch, diffusers) only exist in the GPU image.
    if provider == "fal":
        from factory.media.fal import FalGenerator
        return FalGenerator(api_key)
    if provider == "openai":
        from factory.media.openai import OpenAIMediaGenerator
        return OpenAIMediaGenerator(api_key)
    if provider == "elevenlabs":
        from factory.media.elevenlabs import ElevenLabsGenerator
        return ElevenLabsGenerator(api_key)
    if provider == "diffusers":
        from factory.media.diffusers import DiffusersGenerator
        return DiffusersGenerator()
    raise ConfigurationError("executor_model", f"no media provider named '{provider}'.")
