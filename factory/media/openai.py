"""OpenAI images (`gpt-image-*`, `dall-e-*`), speech (`tts-*`) and transcription (`whisper-1`), via the async SDK.

The SDK reads `OPENAI_BASE_URL` itself, as for chat; retries are the task's (`max_retries=0`)::

    generator = OpenAIMediaGenerator(SecretStr(os.environ["OPENAI_API_KEY"]))
    speech = await generator.generate(MediaRequest(kind="audio", model="tts-1", prompt="Hello."), timeout_s=60)
    transcript = await generator.transcribe(speech.data, speech.media_type, model="whisper-1", timeout_s=60)
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import mimetypes
from decimal import Decimal
from typing import Any

import openai
import pydantic
from pydantic import SecretStr

from factory.errors import ProviderRequestError, TransientProviderError
from factory.media.base import MediaGenerator, MediaKind, MediaRequest, MediaResult, Transcript
from factory.media.http import media_body
from factory.models import Usage
from factory.providers.base import MALFORMED, translate_sdk_error

DEFAULT_VOICE = "alloy"
# A prompt's text tokens never outnumber its UTF-8 bytes; the rest is the request's framing, counted generously.
PROMPT_OVERHEAD_TOKENS = 64
# gpt-image-1 bills an image as output tokens, 6,240 at the dearest published setting (high quality, 1536x1024).
# Rounded up to 8,000 so a new quality tier cannot slip past it; larger custom sizes scale from that area.
IMAGE_OUTPUT_TOKEN_BOUND = 8_000
IMAGE_BOUND_AREA = 1536 * 1024
# Whisper bills the length it decodes; a prober's estimate of the same file can be a frame shorter.
TRANSCRIPTION_SLACK_S = 1
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
AUDIO_SUFFIXES = {"audio/wav": ".wav", "audio/webm": ".webm", "audio/mpeg": ".mp3"}
SDK_ERRORS = (openai.OpenAIError, json.JSONDecodeError, pydantic.ValidationError)


class OpenAIMediaGenerator(MediaGenerator):
    """Images and speech from OpenAI, and transcription of audio for the evaluator; no video."""

    name = "openai"

    def __init__(self, api_key: SecretStr | None) -> None:
        self._client = openai.AsyncOpenAI(api_key=api_key.get_secret_value() if api_key else None, max_retries=0)

    async def aclose(self) -> None:
        """Close the SDK client."""
        await self._client.close()

    async def generate(self, request: MediaRequest, *, timeout_s: float) -> MediaResult:
        """An image (Images API) or speech (Speech API); video is refused."""
        if request.kind is MediaKind.IMAGE:
            return await self._image(request, timeout_s)
        if request.kind is MediaKind.AUDIO:
            return await self._speech(request, timeout_s)
        raise ProviderRequestError(request.model, "OpenAI makes images and speech here, not video; use e.g. "
                                                  "'fal:fal-ai/kling-video/v4/text-to-video'.")

    def usage_bound(self, request: MediaRequest) -> Usage:
        """Speech: its characters. An image: the prompt's bytes as input tokens, and the dearest image's output tokens,
        scaled up for sizes larger than that image's.
        """
        if request.kind is MediaKind.AUDIO:
            return Usage(characters=len(request.prompt))
        area_bound = math.ceil(IMAGE_OUTPUT_TOKEN_BOUND * request.width * request.height / IMAGE_BOUND_AREA)
        return Usage(images=1, input_tokens=len(request.prompt.encode()) + PROMPT_OVERHEAD_TOKENS,
                     output_tokens=max(IMAGE_OUTPUT_TOKEN_BOUND, area_bound))

    async def transcribe(self, data: bytes, media_type: str, *, model: str, timeout_s: float) -> Transcript:
        """The words spoken in `data`, and the seconds billed for hearing them (whole seconds, rounded up).

        Raises:
            TransientProviderError, ProviderAuthError, ProviderRequestError: as for `generate`.

        Example::

            transcript = await generator.transcribe(mp3, "audio/mpeg", model="whisper-1", timeout_s=60)
        """
        suffix = AUDIO_SUFFIXES.get(media_type) or mimetypes.guess_extension(media_type) or ".mp3"
        try:
            reply = await self._client.audio.transcriptions.create(
                model=model, file=(f"audio{suffix}", data, media_type), response_format="verbose_json",
                timeout=timeout_s)
        except SDK_ERRORS as exc:
            raise translate_sdk_error(exc, model, openai) from exc
        text, duration = getattr(reply, "text", None), getattr(reply, "duration", None)
        if not isinstance(text, str) or not isinstance(duration, int | float) or duration < 0:
            raise TransientProviderError(model, MALFORMED, billed_unknown=True)
        return Transcript(text=text, usage=Usage(media_seconds=Decimal(math.ceil(duration))))

    @staticmethod
    def transcription_bound(duration_s: float) -> Usage:
        """The most transcribing `duration_s` seconds of audio can be billed for."""
        return Usage(media_seconds=Decimal(math.ceil(duration_s) + TRANSCRIPTION_SLACK_S))

    async def _image(self, request: MediaRequest, timeout_s: float) -> MediaResult:
        size = f"{request.width}x{request.height}"
        kwargs: dict[str, Any] = {"model": request.model, "prompt": request.prompt, "size": size, "n": 1}
        if request.model.startswith("dall-e-"):
            kwargs["response_format"] = "b64_json"  # DALL-E answers with a URL unless asked; gpt-image-* refuses it
        try:
            response = await self._client.images.generate(**kwargs, timeout=timeout_s)
        except SDK_ERRORS as exc:
            raise translate_sdk_error(exc, request.model, openai) from exc
        reported = getattr(response, "usage", None)
        usage = self._image_usage(reported, request)
        data = getattr(response, "data", None)
        encoded = getattr(data[0], "b64_json", None) if isinstance(data, list) and data else None
        try:
            image = base64.b64decode(encoded or "", validate=True)
        except binascii.Error:
            image = b""
        if not image:  # the image was made and billed, whatever came back
            raise TransientProviderError(request.model, f"{MALFORMED}: no base64 image in `data[0].b64_json`",
                                         billed=usage)
        return MediaResult(data=image,
                           media_type=IMAGE_TYPES.get(getattr(response, "output_format", None) or "png", "image/png"),
                           usage=usage, usage_known=reported is not None or request.model.startswith("dall-e-"),
                           model=request.model)

    async def _speech(self, request: MediaRequest, timeout_s: float) -> MediaResult:
        try:
            speech = await self._client.audio.speech.create(
                model=request.model, voice=request.voice or DEFAULT_VOICE, input=request.prompt,
                response_format="mp3", timeout=timeout_s)
        except SDK_ERRORS as exc:
            raise translate_sdk_error(exc, request.model, openai) from exc
        usage = Usage(characters=len(request.prompt))
        try:
            # The SDK's response is its vendored httpx's Response: the same interface, another class.
            data, _ = media_body(speech.response, request.model)  # type: ignore[arg-type]
        except TransientProviderError as exc:  # speech is billed per input character, whatever came back
            raise TransientProviderError(request.model, str(exc), billed=usage) from exc
        return MediaResult(data=data, media_type="audio/mpeg", usage=usage, model=request.model)

    def _image_usage(self, usage: object, request: MediaRequest) -> Usage:
        # gpt-image-* report their tokens. DALL-E reports none and is priced per image, where the bound costs the
        # same; a compatible server that omits them is charged the bound rather than nothing.
        if usage is None:
            return self.usage_bound(request)
        tokens = getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None)
        if not all(isinstance(t, int) and t >= 0 for t in tokens):
            raise TransientProviderError(request.model, f"{MALFORMED}: unreadable `usage`", billed_unknown=True)
        return Usage(images=1, input_tokens=tokens[0], output_tokens=tokens[1])
