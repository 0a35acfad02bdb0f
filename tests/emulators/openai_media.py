"""OpenAI's image, speech and transcription routes, mixed into the LLM emulator (`tests.emulators.llm.Emulator`).

`/v1/images/generations` answers a real PNG of the requested size, billed in gpt-image-1's output tokens;
`/v1/audio/speech` an MP3 sine whose length follows the text; `/v1/audio/transcriptions` the script's `transcript`
with the uploaded audio's real duration. Faults, scripts and the request record are the emulator's; what each call
billed is appended to its `media_billed` (`factory.models.Usage` field names).
"""

from __future__ import annotations

import base64
import io
import math
import time
from decimal import Decimal
from typing import Any

import av
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.emulators.media import MediaBilled, mp3_bytes, png_bytes, speech_seconds

# gpt-image-1's output tokens for a 1024x1024 image, by quality (published table; other sizes scale by area).
IMAGE_TOKENS_PER_SQUARE = {"low": 272, "medium": 1056, "high": 4160, "auto": 4160}
SQUARE = 1024 * 1024


class OpenAIMediaRoutes:
    """Needs the emulator's `script`, `media_billed`, `_prelude` and `_openai_denied`."""

    script: Any
    media_billed: list[MediaBilled]

    def media_routes(self) -> list[Route]:
        return [
            Route("/v1/images/generations", self.openai_images, methods=["POST"]),
            Route("/v1/audio/speech", self.openai_speech, methods=["POST"]),
            Route("/v1/audio/transcriptions", self.openai_transcriptions, methods=["POST"]),
        ]

    async def openai_images(self, request: Request) -> Response:
        if (denied := self._openai_denied(request)) is not None:
            return denied
        body, fault = await self._prelude(request, "openai")
        if fault is not None:
            return fault
        try:
            width, height = (int(side) for side in body.get("size", "1024x1024").replace("auto", "1024x1024")
                             .split("x"))
        except ValueError:
            return _invalid(f"Invalid value: '{body.get('size')}'. Expected WIDTHxHEIGHT.", "size")
        quality = body.get("quality", "auto")
        text_tokens = len(body["prompt"]) // 4 + 7
        output_tokens = math.ceil(IMAGE_TOKENS_PER_SQUARE[quality] * width * height / SQUARE)
        self.media_billed.append(MediaBilled("openai", body["model"], {
            "images": 1, "input_tokens": text_tokens, "output_tokens": output_tokens}))
        return JSONResponse({
            "created": int(time.time()), "background": "opaque", "output_format": "png",
            "quality": "high" if quality == "auto" else quality, "size": f"{width}x{height}",
            "data": [{"b64_json": base64.b64encode(png_bytes(width, height)).decode()}],
            "usage": {"input_tokens": text_tokens, "output_tokens": output_tokens,
                      "total_tokens": text_tokens + output_tokens,
                      "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
                      "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0}},
        })

    async def openai_speech(self, request: Request) -> Response:
        if (denied := self._openai_denied(request)) is not None:
            return denied
        body, fault = await self._prelude(request, "openai")
        if fault is not None:
            return fault
        if not body.get("input") or not body.get("voice"):
            return _invalid("`input` and `voice` are required.", "input")
        self.media_billed.append(MediaBilled("openai", body["model"], {"characters": len(body["input"])}))
        return Response(mp3_bytes(speech_seconds(body["input"])), media_type="audio/mpeg")

    async def openai_transcriptions(self, request: Request) -> Response:
        if (denied := self._openai_denied(request)) is not None:
            return denied
        async with request.form() as form:
            upload = form.get("file")
            data = await upload.read() if upload is not None and not isinstance(upload, str) else b""
            body = {"model": form.get("model"), "response_format": form.get("response_format", "json"),
                    "filename": getattr(upload, "filename", None),
                    "content_type": getattr(upload, "content_type", None), "bytes": len(data)}
        body, fault = await self._prelude(request, "openai", body)
        if fault is not None:
            return fault
        try:
            with av.open(io.BytesIO(data)) as container:
                duration = round(container.duration / 1_000_000, 2)
        except (av.FFmpegError, TypeError):
            return _invalid("Invalid file format. Supported formats: flac, m4a, mp3, mp4, wav, webm", "file")
        self.media_billed.append(MediaBilled("openai", body["model"], {"media_seconds": Decimal(math.ceil(duration))}))
        if body["response_format"] != "verbose_json":
            return JSONResponse({"text": self.script.transcript})
        return JSONResponse({"task": "transcribe", "language": "english", "duration": duration,
                             "text": self.script.transcript, "segments": [],
                             "usage": {"type": "duration", "seconds": math.ceil(duration)}})


def _invalid(message: str, param: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=400)
