"""The media generators against the loopback emulators, through the real openai SDK and httpx: media, money, faults."""

from __future__ import annotations

import io
import math
import time
from decimal import Decimal

import av
import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from factory.errors import ProviderAuthError, ProviderRequestError, TransientProviderError
from factory.media import MediaGenerator, MediaKind, MediaRequest, make_media_generator
from factory.media.elevenlabs import DEFAULT_VOICE_ID
from factory.media.fal import FalGenerator
from factory.media.http import check_status
from factory.media.openai import IMAGE_OUTPUT_TOKEN_BOUND, OpenAIMediaGenerator
from factory.models import Usage
from factory.pricing import price_for
from factory.settings import get_settings
from tests.emulators.llm import OPENAI_KEY, Emulator, Script
from tests.emulators.media import ELEVENLABS_KEY, FAL_KEY, MediaBilled, MediaEmulator, MediaScript, speech_seconds

KEYS = {"fal": FAL_KEY, "elevenlabs": ELEVENLABS_KEY, "openai": OPENAI_KEY}
FLUX = "fal-ai/flux/schnell"
KLING = "fal-ai/kling-video/v4/text-to-video"
REQUESTS = {
    "fal-image": ("fal", f"fal:{FLUX}", MediaRequest(kind=MediaKind.IMAGE, model=FLUX, prompt="a red fox", seed=7,
                                                     width=1024, height=768)),
    "fal-video": ("fal", f"fal:{KLING}", MediaRequest(kind=MediaKind.VIDEO, model=KLING, prompt="waves at dusk",
                                                      width=1280, height=720, duration_s=5)),
    "elevenlabs": ("elevenlabs", "elevenlabs:eleven_multilingual_v2",
                   MediaRequest(kind=MediaKind.AUDIO, model="eleven_multilingual_v2",
                                prompt="Hello from the Factory.")),
    "openai-image": ("openai", "gpt-image-1", MediaRequest(kind=MediaKind.IMAGE, model="gpt-image-1",
                                                           prompt="a lighthouse", width=1536, height=1024)),
    "openai-speech": ("openai", "tts-1", MediaRequest(kind=MediaKind.AUDIO, model="tts-1",
                                                      prompt="Welcome to the emulated speech.")),
}


@pytest.fixture
def emulators(llm, media_api):
    return {"openai": llm, "fal": media_api, "elevenlabs": media_api}


@pytest.fixture
async def generator():
    made: list[MediaGenerator] = []

    def make(provider: str, key: str | None = None) -> MediaGenerator:
        secret = SecretStr(key or KEYS[provider])
        made.append(FalGenerator(secret, poll_interval_s=0.01) if provider == "fal"
                    else make_media_generator(provider, secret))
        return made[-1]

    yield make
    for each in made:
        await each.aclose()


def script(emulator: Emulator | MediaEmulator, **fields):
    return emulator.reset(Script(**fields) if isinstance(emulator, Emulator) else MediaScript(**fields))


def billed(emulator: Emulator | MediaEmulator) -> list[MediaBilled]:
    return emulator.media_billed if isinstance(emulator, Emulator) else emulator.billed


def assert_billed_exactly(result, emulator, priced_as: str, request: MediaRequest, made: MediaGenerator) -> None:
    """The usage is what the emulator billed, unit by unit; priced, it fits under the generator's bound."""
    [charge] = billed(emulator)
    assert charge.model == priced_as
    assert result.usage == Usage(**charge.usage)
    price = price_for(priced_as, get_settings())
    assert price.cost(result.usage) > 0
    assert price.cost(made.usage_bound(request)) >= price.cost(result.usage)


def audio_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.audio, "no audio stream"
        return container.duration / 1_000_000


# --- what each generator makes, and what it costs -----------------------------------------------
@pytest.mark.parametrize(("width", "height", "megapixels"), [(1024, 768, 1), (1100, 1000, 2)])
async def test_fal_image_is_a_png_of_the_size_billed_per_megapixel(media_api, generator, width, height, megapixels):
    request = REQUESTS["fal-image"][2].model_copy(update={"width": width, "height": height})
    made = generator("fal")
    result = await made.generate(request, timeout_s=10)
    image = Image.open(io.BytesIO(result.data))
    assert (image.format, image.size, result.media_type) == ("PNG", (width, height), "image/png")
    assert result.usage == Usage(images=1, megapixels=megapixels)
    assert_billed_exactly(result, media_api, f"fal:{FLUX}", request, made)
    post, download = media_api.requests
    assert post["path"] == f"/fal/{FLUX}" and post["headers"]["authorization"] == f"Key {FAL_KEY}"
    assert post["body"] == {"prompt": "a red fox", "image_size": {"width": width, "height": height},
                            "num_images": 1, "output_format": "png", "seed": 7}
    assert download["api"] == "files" and "authorization" not in download["headers"], "the CDN must not see the key"


async def test_fal_image_inline_as_data_uri(media_api, generator):
    script(media_api, data_uri=True)
    result = await generator("fal").generate(REQUESTS["fal-image"][2], timeout_s=10)
    assert Image.open(io.BytesIO(result.data)).size == (1024, 768)
    assert [r["api"] for r in media_api.requests] == ["fal"]


async def test_fal_video_polls_the_queue_until_completed(media_api, generator):
    script(media_api, queue_polls=2, progress_polls=3)
    _, priced_as, request = REQUESTS["fal-video"]
    made = generator("fal")
    result = await made.generate(request, timeout_s=10)
    assert result.media_type == "video/mp4" and result.usage == Usage(media_seconds=Decimal(5))
    with av.open(io.BytesIO(result.data)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (320, 180) and round(container.duration / 1_000_000) == 5
    assert_billed_exactly(result, media_api, priced_as, request, made)
    assert price_for(priced_as, get_settings()).cost(result.usage) == Decimal("0.785")
    submit = media_api.requests[0]
    assert submit["path"] == f"/fal-queue/{KLING}"
    assert submit["body"] == {"prompt": "waves at dusk", "duration": "5", "aspect_ratio": "16:9"}
    polls = [r for r in media_api.requests if r["path"].endswith("/status")]
    assert len(polls) == 2 + 3 + 1, "IN_QUEUE twice, IN_PROGRESS three times, then COMPLETED"


async def test_fal_video_rides_out_a_failed_poll_and_pays_once(media_api, generator):
    script(media_api, faults=[None, "500", "429"])
    result = await generator("fal").generate(REQUESTS["fal-video"][2], timeout_s=10)
    assert result.usage.media_seconds == 5
    assert media_api.faults_sent == ["500", "429"]
    assert len(media_api.billed) == 1 and sum(r["path"] == f"/fal-queue/{KLING}" for r in media_api.requests) == 1


async def test_fal_video_unknown_status_is_a_failure(media_api, generator):
    script(media_api, final_status="FAILED")
    with pytest.raises(TransientProviderError, match="reported status 'FAILED'"):
        await generator("fal").generate(REQUESTS["fal-video"][2], timeout_s=10)


async def test_fal_video_past_the_deadline_is_cancelled(media_api, generator):
    script(media_api, queue_polls=10**6)
    started = time.monotonic()
    with pytest.raises(TransientProviderError, match="not done within 0.5s") as caught:
        await generator("fal").generate(REQUESTS["fal-video"][2], timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert caught.value.retry_after_s is None
    assert media_api.cancelled == list(media_api.jobs) and media_api.billed == []


@pytest.mark.parametrize(("provider", "kind"), [("fal", MediaKind.AUDIO), ("openai", MediaKind.VIDEO),
                                                ("elevenlabs", MediaKind.IMAGE)])
async def test_unsupported_kinds_are_refused_without_a_call(emulators, generator, provider, kind):
    with pytest.raises(ProviderRequestError, match="not"):
        await generator(provider).generate(MediaRequest(kind=kind, model="m", prompt="p"), timeout_s=5)
    assert emulators[provider].requests == []


async def test_elevenlabs_speech_is_billed_its_character_cost(media_api, generator):
    _, priced_as, request = REQUESTS["elevenlabs"]
    made = generator("elevenlabs")
    result = await made.generate(request, timeout_s=10)
    assert result.media_type == "audio/mpeg"
    assert audio_seconds(result.data) == pytest.approx(speech_seconds(request.prompt), abs=0.1)
    assert result.usage == Usage(characters=len(request.prompt))
    assert_billed_exactly(result, media_api, priced_as, request, made)
    [call] = media_api.requests
    assert call["path"] == f"/elevenlabs/v1/text-to-speech/{DEFAULT_VOICE_ID}"
    assert call["query"] == {"output_format": "mp3_44100_128"} and call["headers"]["xi-api-key"] == ELEVENLABS_KEY
    assert call["body"] == {"text": request.prompt, "model_id": "eleven_multilingual_v2"}


@pytest.mark.parametrize(("scripted", "characters"), [({"character_cost": 11}, 11),
                                                      ({"send_character_cost": False}, 23)])
async def test_elevenlabs_reads_the_character_cost_header(media_api, generator, scripted, characters):
    script(media_api, **scripted)
    request = REQUESTS["elevenlabs"][2].model_copy(update={"voice": "my-voice"})
    result = await generator("elevenlabs").generate(request, timeout_s=10)
    assert result.usage == Usage(characters=characters)
    assert media_api.requests[0]["path"].endswith("/text-to-speech/my-voice")


async def test_openai_image_is_billed_its_tokens(llm, generator):
    _, priced_as, request = REQUESTS["openai-image"]
    made = generator("openai")
    result = await made.generate(request, timeout_s=10)
    image = Image.open(io.BytesIO(result.data))
    assert (image.format, image.size, result.media_type) == ("PNG", (1536, 1024), "image/png")
    assert result.usage.output_tokens == 6240 <= IMAGE_OUTPUT_TOKEN_BOUND
    assert_billed_exactly(result, llm, priced_as, request, made)
    [call] = llm.requests
    assert call["path"] == "/v1/images/generations"
    assert call["body"] == {"model": "gpt-image-1", "prompt": "a lighthouse", "size": "1536x1024", "n": 1}
    assert call["headers"].get("x-stainless-retry-count", "0") == "0"


async def test_openai_speech_and_its_transcription(llm, generator):
    script(llm, transcript="Welcome to the emulated speech.")
    _, priced_as, request = REQUESTS["openai-speech"]
    made = generator("openai")
    speech = await made.generate(request, timeout_s=10)
    assert speech.media_type == "audio/mpeg" and speech.usage == Usage(characters=len(request.prompt))
    assert_billed_exactly(speech, llm, priced_as, request, made)
    assert llm.requests[0]["body"] == {"model": "tts-1", "voice": "alloy", "input": request.prompt,
                                       "response_format": "mp3"}

    llm.media_billed.clear()
    seconds = audio_seconds(speech.data)
    assert not seconds.is_integer(), "the rounding below needs a fractional length"
    transcript = await made.transcribe(speech.data, speech.media_type, model="whisper-1", timeout_s=10)
    assert transcript.text == "Welcome to the emulated speech."
    assert transcript.usage == Usage(media_seconds=Decimal(math.ceil(seconds)))
    [charge] = llm.media_billed
    assert transcript.usage == Usage(**charge.usage)
    price = price_for("whisper-1", get_settings())
    assert price.cost(OpenAIMediaGenerator.transcription_bound(seconds)) >= price.cost(transcript.usage) > 0
    upload = llm.requests[-1]["body"]
    assert (upload["filename"], upload["content_type"], upload["response_format"]) == \
        ("audio.mp3", "audio/mpeg", "verbose_json")


# --- faults: the same meaning from every provider -------------------------------------------------
CASES = list(REQUESTS)


@pytest.mark.parametrize("case", CASES)
async def test_rate_limit_is_transient_with_retry_after(emulators, generator, case):
    provider, _, request = REQUESTS[case]
    script(emulators[provider], faults=["429"], retry_after="2.5")
    with pytest.raises(TransientProviderError, match="HTTP 429") as caught:
        await generator(provider).generate(request, timeout_s=10)
    assert caught.value.retry_after_s == 2.5
    assert billed(emulators[provider]) == []


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("fault", "match"), [("500", "HTTP 500"), ("malformed", "malformed")])
async def test_server_errors_and_garbled_replies_are_transient(emulators, generator, case, fault, match):
    provider, _, request = REQUESTS[case]
    script(emulators[provider], faults=[fault])
    with pytest.raises(TransientProviderError, match=match):
        await generator(provider).generate(request, timeout_s=10)


@pytest.mark.parametrize("case", CASES)
async def test_bad_request_is_not_retried_and_quotes_the_reply(emulators, generator, case):
    provider, _, request = REQUESTS[case]
    script(emulators[provider], faults=["400"])
    with pytest.raises(ProviderRequestError, match=r"rejected \(HTTP 400\)"):
        await generator(provider).generate(request, timeout_s=10)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scripted", [True, False], ids=["scripted-401", "wrong-key"])
async def test_refused_key_is_an_auth_error_that_never_shows_the_key(emulators, generator, case, scripted):
    provider, _, request = REQUESTS[case]
    key = KEYS[provider] if scripted else "sk-wrong-but-secret-0123456789"
    script(emulators[provider], faults=["401"] if scripted else [])
    with pytest.raises(ProviderAuthError, match="API key was refused") as caught:
        await generator(provider, key).generate(request, timeout_s=10)
    assert key not in str(caught.value) and key.split(":")[-1] not in str(caught.value)


@pytest.mark.parametrize("case", CASES)
async def test_hang_past_timeout_is_transient(emulators, generator, case):
    provider, _, request = REQUESTS[case]
    script(emulators[provider], faults=["hang"], hang_s=1.5)
    started = time.monotonic()
    with pytest.raises(TransientProviderError, match="timed out|longer than"):
        await generator(provider).generate(request, timeout_s=0.5)
    assert time.monotonic() - started < 1.5


async def test_transcription_faults_translate_like_generation(llm, generator):
    script(llm, faults=["429", "malformed"], retry_after="4")
    made = generator("openai")
    with pytest.raises(TransientProviderError) as caught:
        await made.transcribe(b"not audio", "audio/mpeg", model="whisper-1", timeout_s=10)
    assert caught.value.retry_after_s == 4
    with pytest.raises(TransientProviderError, match="malformed"):
        await made.transcribe(b"not audio", "audio/mpeg", model="whisper-1", timeout_s=10)
    with pytest.raises(ProviderRequestError, match="Invalid file format"):
        await made.transcribe(b"not audio", "audio/mpeg", model="whisper-1", timeout_s=10)


@pytest.mark.fast
def test_quoted_replies_never_carry_the_key():
    key = "fal-key-id:fal-very-secret"
    request = httpx.Request("POST", "https://fal.run/x", headers={"Authorization": f"Key {key}"})
    response = httpx.Response(422, text=f"bad header 'Key {key}' and {key.upper()} and {key}", request=request)
    with pytest.raises(ProviderRequestError) as caught:
        check_status(response, "x")
    assert key not in str(caught.value) and "***" in str(caught.value)


@pytest.mark.fast
async def test_bounds_cover_the_dearest_outcome(generator):
    openai = generator("openai")
    assert openai.usage_bound(REQUESTS["openai-image"][2]) == Usage(
        images=1, input_tokens=len(b"a lighthouse") + 64, output_tokens=IMAGE_OUTPUT_TOKEN_BOUND)
    big = MediaRequest(kind=MediaKind.IMAGE, model="gpt-image-1", prompt="p", width=3072, height=2048)
    assert openai.usage_bound(big).output_tokens == 4 * IMAGE_OUTPUT_TOKEN_BOUND
    odd = MediaRequest(kind=MediaKind.IMAGE, model=FLUX, prompt="p", width=1000, height=1000)
    assert generator("fal").usage_bound(odd) == Usage(images=1, megapixels=1)
    assert generator("fal").usage_bound(odd.model_copy(update={"width": 1030})) == Usage(images=1, megapixels=2)
