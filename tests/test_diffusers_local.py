"""The GPU-local diffusers path, run on CPU with a tiny random pipeline built offline (no weights, no downloads)."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import wave
from decimal import Decimal
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from factory.errors import ProviderRequestError, TransientProviderError
from factory.media import MediaRequest, make_media_generator, media_api_model
from factory.settings import get_settings
from tests.conftest import reset_settings

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FACTORY_DIFFUSERS_STEPS": "2"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in OFFLINE.items():
            mp.setenv(name, value)
        from tests.tiny_pipeline import build_tiny_text_to_image_pipeline
        return build_tiny_text_to_image_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def fresh_model(tiny_model, tmp_path) -> Path:
    """A copy of the tiny model at a path this process has not loaded yet."""
    return Path(shutil.copytree(tiny_model, tmp_path / "tiny-sd"))


@pytest.fixture
def load_calls(monkeypatch) -> list[str]:
    """Every `DiffusionPipeline.from_pretrained` call from here on."""
    from diffusers import DiffusionPipeline
    calls: list[str] = []
    original = DiffusionPipeline.from_pretrained

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", counting)
    return calls


def image_request(model: str | Path, seed: int | None = 7) -> MediaRequest:
    return MediaRequest(kind="image", model=media_api_model(f"diffusers:{model}"), prompt="a red fox in snow",
                        width=64, height=64, seed=seed)


async def generate(request: MediaRequest, timeout_s: float = 120):
    generator = make_media_generator("diffusers", None)
    try:
        return await generator.generate(request, timeout_s=timeout_s)
    finally:
        await generator.aclose()


async def test_generates_a_png_billed_in_whole_gpu_seconds(tiny_model):
    request = image_request(tiny_model)
    assert request.model == str(tiny_model)
    result = await generate(request)
    assert result.media_type == "image/png"
    assert result.model == str(tiny_model)
    with Image.open(io.BytesIO(result.data)) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert result.usage.gpu_seconds >= 1
    assert result.usage.gpu_seconds == result.usage.gpu_seconds.to_integral_value()
    bound = make_media_generator("diffusers", None).usage_bound(request)
    assert bound.gpu_seconds == Decimal(get_settings().gpu_timeout_s)


async def test_the_seed_fixes_the_image(tiny_model):
    first, again, other = [await generate(image_request(tiny_model, seed)) for seed in (11, 11, 12)]
    assert first.data == again.data
    assert first.data != other.data


async def test_the_pipeline_loads_once_even_for_concurrent_requests(fresh_model, load_calls):
    from factory.media.diffusers import loaded_models
    results = await asyncio.gather(*(generate(image_request(fresh_model, seed)) for seed in (1, 2)))
    await generate(image_request(fresh_model, 3))
    assert all(r.media_type == "image/png" for r in results)
    assert load_calls == [str(fresh_model.resolve())]
    assert loaded_models().count(str(fresh_model.resolve())) == 1


async def test_a_relative_path_resolves_under_the_models_dir(tiny_model, monkeypatch):
    from factory.media.diffusers import resolve_model_path
    monkeypatch.setenv("FACTORY_MODELS_DIR", str(tiny_model.parent))
    reset_settings()
    assert resolve_model_path(tiny_model.name) == tiny_model
    result = await generate(image_request(tiny_model.name))
    assert result.media_type == "image/png"
    assert result.model == tiny_model.name


async def test_a_missing_pipeline_names_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTORY_MODELS_DIR", str(tmp_path))
    reset_settings()
    missing = tmp_path / "not-there"
    with pytest.raises(ProviderRequestError, match=re.escape(f"no diffusers pipeline at {missing}")) as info:
        await generate(image_request("not-there"))
    assert not isinstance(info.value, TransientProviderError)
    assert "network volume" in str(info.value)


async def test_a_request_past_its_timeout_is_transient(tiny_model):
    with pytest.raises(TransientProviderError, match="no result within"):
        await generate(image_request(tiny_model), timeout_s=0.001)


async def test_preload_from_env_loads_the_listed_models(fresh_model, monkeypatch, load_calls):
    from factory.media.diffusers import loaded_models, preload_from_env
    monkeypatch.setenv("FACTORY_PRELOAD_MODELS", f" diffusers:{fresh_model} ,")
    reset_settings()
    preload_from_env()
    assert str(fresh_model.resolve()) in loaded_models()
    await generate(image_request(fresh_model))
    assert load_calls == [str(fresh_model.resolve())]


def test_video_frames_encode_as_h264_mp4_and_audio_as_16_bit_wav():
    from factory.media.diffusers import VIDEO_FPS, encode_mp4, encode_wav
    frames = np.random.default_rng(0).random((10, 64, 48, 3), dtype=np.float32)  # float [0, 1], as output_type="np"
    with av.open(io.BytesIO(encode_mp4(frames))) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert (stream.codec_context.name, stream.average_rate) == ("h264", VIDEO_FPS)
        assert (len(decoded), decoded[0].width, decoded[0].height) == (10, 48, 64)

    stereo = np.sin(np.linspace(0, 200, 32_000, dtype=np.float32)).reshape(2, 16_000)  # channels x samples
    with wave.open(io.BytesIO(encode_wav(stereo, 16_000))) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()) == (2, 2, 16_000, 16_000)
