"""ElevenLabs text-to-speech over its HTTP API.

Models are named `elevenlabs:<model_id>` (`elevenlabs:eleven_multilingual_v2`); `MediaRequest.voice` is a voice id.
The key is `ELEVENLABS_API_KEY` or the Secret block `elevenlabs-api-key`; `FACTORY_ELEVENLABS_URL` moves the host::

    generator = ElevenLabsGenerator(SecretStr(os.environ["ELEVENLABS_API_KEY"]))
    speech = await generator.generate(MediaRequest(kind="audio", model="eleven_multilingual_v2", prompt="Hi."),
                                      timeout_s=60)
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
from pydantic import SecretStr

from factory.errors import ProviderAuthError, ProviderRequestError, TransientProviderError
from factory.media.base import MediaGenerator, MediaKind, MediaRequest, MediaResult
from factory.media.http import deadline, media_body, send
from factory.models import Usage
from factory.providers.base import MALFORMED
from factory.settings import get_settings

# "Rachel": a premade voice every account has had since 2023, so a request without a voice works anywhere.
DEFAULT_VOICE_ID = "21m00Tcm4TlvDq8ikWAM"
OUTPUT_FORMAT = "mp3_44100_128"


class ElevenLabsGenerator(MediaGenerator):
    """Speech as MP3, billed by the `character-cost` ElevenLabs reports for the call."""

    name = "elevenlabs"

    def __init__(self, api_key: SecretStr | None) -> None:
        headers = {"xi-api-key": api_key.get_secret_value()} if api_key else {}
        self._has_key = api_key is not None
        self._client = httpx.AsyncClient(headers=headers)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def generate(self, request: MediaRequest, *, timeout_s: float) -> MediaResult:
        """Speech of `request.prompt` as MP3, in `request.voice` (else a premade voice); no images or video."""
        if request.kind is not MediaKind.AUDIO:
            raise ProviderRequestError(request.model, f"ElevenLabs makes speech, not {request.kind.value}.")
        if not self._has_key:
            raise ProviderAuthError(request.model, "no ElevenLabs API key: set ELEVENLABS_API_KEY or create the "
                                                   "Secret block 'elevenlabs-api-key' (python -m blocks.register).")
        voice = quote(request.voice or DEFAULT_VOICE_ID, safe="")
        url = f"{get_settings().elevenlabs_url.rstrip('/')}/v1/text-to-speech/{voice}"
        async with deadline(request.model, timeout_s):
            response = await send(self._client, "POST", url, model=request.model, timeout_s=timeout_s,
                                  params={"output_format": OUTPUT_FORMAT},
                                  json={"text": request.prompt, "model_id": request.model})
        usage = Usage(characters=_characters(response, request))
        try:
            data, _ = media_body(response, request.model)
        except TransientProviderError as exc:  # the speech was billed, whatever came back
            raise TransientProviderError(request.model, str(exc), billed=usage) from exc
        return MediaResult(data=data, media_type="audio/mpeg", usage=usage, model=request.model)

    def usage_bound(self, request: MediaRequest) -> Usage:
        """One character billed per character of the prompt."""
        return Usage(characters=len(request.prompt))


def _characters(response: httpx.Response, request: MediaRequest) -> int:
    """What ElevenLabs billed: its `character-cost` header, else (older deployments) the text's length."""
    value = response.headers.get("character-cost")
    if value is None:
        return len(request.prompt)
    if not value.strip().isdecimal():  # billed, for an amount it did not say: charged the call's worst case
        raise TransientProviderError(request.model, f"{MALFORMED}: character-cost {value[:20]!r}",
                                     billed_unknown=True)
    return int(value)
