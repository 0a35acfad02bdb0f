"""The GPU generation flows: one diffusers generation each, run on the `factory-gpu` RunPod pool.

The job flow submits them to the pool (`tasks/media.py`); a `runpod` worker sends each one to the
RunPod endpoint, whose handler.py executes the flow run from its bundle on a GPU. They are
separate flows per kind so each can be bound to its own endpoint (a 24 GB card for images, 48 GB+
for video) with `.with_options(job_variables={"endpoint_id": ...})` or a pool per kind
(FACTORY_GPU_POOL).
"""

from __future__ import annotations

from prefect import flow

from factory.media import MediaKind, MediaRequest, MediaResult, make_media_generator
from factory.settings import get_settings
from workers.decorators import runpod


async def _generate(request: MediaRequest) -> MediaResult:
    generator = make_media_generator("diffusers", None)
    return await generator.generate(request, timeout_s=get_settings().gpu_timeout_s)


@runpod(work_pool=get_settings().gpu_pool)
@flow(name="factory-gpu-image", persist_result=True)
async def generate_image_gpu(request: MediaRequest) -> MediaResult:
    """Generate one image with a diffusers pipeline on this worker's GPU."""
    return await _generate(request)


@runpod(work_pool=get_settings().gpu_pool)
@flow(name="factory-gpu-audio", persist_result=True)
async def generate_audio_gpu(request: MediaRequest) -> MediaResult:
    """Generate one audio clip with a diffusers audio pipeline on this worker's GPU."""
    return await _generate(request)


@runpod(work_pool=get_settings().gpu_pool)
@flow(name="factory-gpu-video", persist_result=True)
async def generate_video_gpu(request: MediaRequest) -> MediaResult:
    """Generate one video with a diffusers video pipeline on this worker's GPU."""
    return await _generate(request)


GPU_FLOWS = {MediaKind.IMAGE: generate_image_gpu, MediaKind.AUDIO: generate_audio_gpu,
             MediaKind.VIDEO: generate_video_gpu}
