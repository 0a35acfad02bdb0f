"""GPU-local media generation: a diffusers pipeline, loaded once per process from a local directory.

This runs inside the RunPod worker image (`pip install the-factory[gpu]`), reached with the model name
`diffusers:<model path>`. Weights are never downloaded: bake them into the image or put them on the network volume
(mounted at `/runpod-volume`); a relative path resolves under `FACTORY_MODELS_DIR`. Load models before the first job
by listing them in `FACTORY_PRELOAD_MODELS` and calling `preload_from_env()` at the handler's import:

    FACTORY_PRELOAD_MODELS=sdxl-turbo,/models/audioldm2 python handler.py
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import math
import threading
import time
import wave
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import av
import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline
from packaging.version import Version

from factory.errors import ProviderRequestError, TransientProviderError
from factory.media.base import MediaGenerator, MediaKind, MediaRequest, MediaResult
from factory.models import Usage
from factory.settings import get_settings

VIDEO_FPS = 8
DEFAULT_SAMPLE_RATE = 16_000  # for audio pipelines that expose none

# diffusers 0.40 renamed `torch_dtype` to `dtype` (and warns on the old name); older releases ignore `dtype`.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype"
logger = logging.getLogger(__name__)


@dataclass
class _Loaded:
    pipe: DiffusionPipeline
    params: frozenset[str]  # what the pipeline's __call__ accepts, read once
    # A pipeline is not thread-safe (its scheduler keeps per-call state): one call at a time.
    lock: threading.Lock = field(default_factory=threading.Lock)


_PIPELINES: dict[str, _Loaded] = {}
_LOAD_LOCK = threading.Lock()  # two requests for an unloaded model load it once


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_path(model: str) -> Path:
    """The directory a model name names: absolute as given, relative under `FACTORY_MODELS_DIR`.

    Example:
        >>> resolve_model_path("sdxl-turbo")
        PosixPath('/runpod-volume/models/sdxl-turbo')
    """
    path = Path(model).expanduser()
    return path if path.is_absolute() else get_settings().models_dir / path


def _load(model: str) -> _Loaded:
    path = resolve_model_path(model)
    if not (path / "model_index.json").is_file():
        raise ProviderRequestError(model, f"no diffusers pipeline at {path}; bake it into the image or put it on "
                                          f"the network volume (relative paths resolve under $FACTORY_MODELS_DIR).")
    key = str(path.resolve())
    with _LOAD_LOCK:
        if key not in _PIPELINES:
            device = _device()
            dtype = torch.float16 if device == "cuda" else torch.float32
            started = time.monotonic()
            try:
                pipe = DiffusionPipeline.from_pretrained(  # type: ignore[no-untyped-call]  # diffusers leaves it bare
                    key, local_files_only=True, **{_DTYPE_KWARG: dtype})
            except (OSError, ValueError) as exc:
                raise ProviderRequestError(model, f"could not load the diffusers pipeline at {path}: {exc}") from exc
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)  # tqdm bars only clutter the worker's log
            params = frozenset(inspect.signature(pipe.__call__).parameters)
            _PIPELINES[key] = _Loaded(pipe, params)
            logger.info("Loaded %s (%s) on %s in %.1fs", path, type(pipe).__name__, device,
                        time.monotonic() - started)
        return _PIPELINES[key]


def loaded_models() -> list[str]:
    """The resolved paths of the pipelines this process holds."""
    return list(_PIPELINES)


def preload(paths: Iterable[str]) -> None:
    """Load pipelines now, so the first request does not wait for them.

    Args:
        paths: model paths as in `diffusers:<path>` (the prefix may be kept); blanks are skipped.

    Raises:
        ProviderRequestError: a path holds no loadable pipeline.

    Example:
        >>> preload(["sdxl-turbo"])
    """
    for model in paths:
        model = model.strip().removeprefix("diffusers:")
        if model:
            _load(model)


def preload_from_env() -> None:
    """`preload` the comma-separated model paths in `FACTORY_PRELOAD_MODELS`; call it at the handler's import."""
    preload(get_settings().preload_models.split(","))


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _uint8_frames(frames: Any) -> list[np.ndarray]:
    """Frames as H x W x 3 uint8 arrays: from a list of PIL images, or a float [0, 1] or uint8 array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.float().cpu().numpy()
    arrays = [np.asarray(frame) for frame in frames]
    if arrays and arrays[0].dtype != np.uint8:
        arrays = [(np.clip(a, 0, 1) * 255).round().astype(np.uint8) for a in arrays]
    return arrays


def encode_mp4(frames: Any, fps: int = VIDEO_FPS) -> bytes:
    """H.264 MP4 (yuv420p, constant `fps`) of a video pipeline's `frames[0]`: PIL images or an F x H x W x C array.

    Example:
        >>> encode_mp4(np.zeros((8, 64, 64, 3), dtype=np.uint8))[4:8]
        b'ftyp'
    """
    arrays = _uint8_frames(frames)
    height, width = (d // 2 * 2 for d in arrays[0].shape[:2])  # yuv420p needs even sides
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for array in arrays:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array[:height, :width, :3]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def _sample_rate(pipe: DiffusionPipeline) -> int:
    for owner, attr in (("vae", "config"), ("vocoder", "config"), ("feature_extractor", None)):
        source = getattr(pipe, owner, None)
        source = getattr(source, attr, None) if attr else source
        rate = getattr(source, "sampling_rate", None)
        if isinstance(rate, int) and rate > 0:
            return rate
    return DEFAULT_SAMPLE_RATE


def encode_wav(audio: Any, sample_rate: int) -> bytes:
    """16-bit PCM WAV of an audio pipeline's `audios[0]`: floats in [-1, 1], samples or channels x samples.

    Example:
        >>> encode_wav(np.zeros(16_000, dtype=np.float32), 16_000)[:4]
        b'RIFF'
    """
    samples = audio.float().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if samples.ndim == 2 and samples.shape[0] < samples.shape[1]:
        samples = samples.T  # channels-first -> frames x channels
    samples = samples.reshape(samples.shape[0], -1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(samples.shape[1])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes())
    return buf.getvalue()


def _call_kwargs(loaded: _Loaded, request: MediaRequest) -> dict[str, Any]:
    wanted: dict[str, Any] = {"prompt": request.prompt, "height": request.height, "width": request.width}
    if request.kind is MediaKind.VIDEO:
        wanted["num_frames"] = request.duration_s * VIDEO_FPS
    if request.kind is MediaKind.AUDIO:
        wanted["audio_length_in_s"] = float(request.duration_s)
    if (steps := get_settings().diffusers_steps) is not None:
        wanted["num_inference_steps"] = steps
    if request.seed is not None:
        wanted["generator"] = torch.Generator(_device()).manual_seed(request.seed)
    # Only what this pipeline takes: audio pipelines have no height/width, image ones no num_frames.
    return {name: value for name, value in wanted.items() if name in loaded.params}


def _encode(loaded: _Loaded, output: Any, request: MediaRequest) -> tuple[bytes, str]:
    attr = {MediaKind.IMAGE: "images", MediaKind.VIDEO: "frames", MediaKind.AUDIO: "audios"}[request.kind]
    if not hasattr(output, attr):
        raise ProviderRequestError(request.model, f"the pipeline {type(loaded.pipe).__name__} makes no "
                                                  f"{request.kind.value} (its output has no `{attr}`); use a "
                                                  f"{request.kind.value} model for this function.")
    first = getattr(output, attr)[0]
    if request.kind is MediaKind.IMAGE:
        return _png(first), "image/png"
    if request.kind is MediaKind.VIDEO:
        return encode_mp4(first), "video/mp4"
    return encode_wav(first, _sample_rate(loaded.pipe)), "audio/wav"


def _generate_blocking(request: MediaRequest, deadline: float) -> MediaResult:
    loaded = _load(request.model)
    if not loaded.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise TimeoutError  # a call before ours held the pipeline past our deadline: do not start late
    try:
        kwargs = _call_kwargs(loaded, request)
        started = time.monotonic()
        try:
            output = loaded.pipe(**kwargs)  # type: ignore[operator]  # each pipeline class defines __call__
        except ValueError as exc:  # the pipeline's own input checks (sizes, lengths)
            raise ProviderRequestError(request.model, f"the pipeline rejected the request: {exc}") from exc
        elapsed = time.monotonic() - started
    finally:
        loaded.lock.release()
    data, media_type = _encode(loaded, output, request)
    # RunPod bills per second, rounded up.
    usage = Usage(gpu_seconds=Decimal(max(1, math.ceil(elapsed))))
    return MediaResult(data=data, media_type=media_type, usage=usage, model=request.model)


class DiffusersGenerator(MediaGenerator):
    """A diffusers pipeline on this machine's GPU (CPU when there is none), from a local model directory.

    Example:
        >>> generator = DiffusersGenerator()
        >>> await generator.generate(MediaRequest(kind="image", model="sdxl-turbo", prompt="a fox"), timeout_s=120)
    """

    name = "diffusers"

    async def generate(self, request: MediaRequest, *, timeout_s: float) -> MediaResult:
        """Run the pipeline in a worker thread; the first call for a model loads it.

        Raises:
            ProviderRequestError: no pipeline at the path, or it cannot make this kind of media or take this input.
            TransientProviderError: no result within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        try:
            # A thread cannot be killed: on timeout a load or pipeline call runs on to its end in the background
            # (a retry then finds the model loaded; a later call waits for the pipeline up to its own deadline).
            return await asyncio.wait_for(asyncio.to_thread(_generate_blocking, request, deadline), timeout_s)
        except TimeoutError as exc:
            # The GPU kept working all the while (and may still be): charged the call's worst case.
            raise TransientProviderError(request.model, f"no result within {timeout_s:g}s; raise "
                                                        f"FACTORY_GPU_TIMEOUT_S or ask for less",
                                         billed_unknown=True) from exc

    def usage_bound(self, request: MediaRequest) -> Usage:
        """`FACTORY_GPU_TIMEOUT_S` of GPU time: the longest one generation may run."""
        return Usage(gpu_seconds=Decimal(get_settings().gpu_timeout_s))
