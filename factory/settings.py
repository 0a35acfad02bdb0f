"""Process settings of the Factory, read from `FACTORY_*` environment variables.

The SDKs keep their own variables (`ANTHROPIC_API_KEY`, `OPENAI_BASE_URL`, ...); this class
holds only what is the Factory's own. Example::

    FACTORY_STORAGE_ROOT=/srv/factory FACTORY_DEFAULT_EXECUTOR_MODEL=gpt-5.4 prefect worker start ...
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "claude-sonnet-5-5"


class FactorySettings(BaseSettings):
    """The Factory's own settings, one `FACTORY_<NAME>` variable each; read once per process by `get_settings`."""

    model_config = SettingsConfigDict(env_prefix="FACTORY_", extra="ignore")

    storage_root: Path = Field(
        default=Path("~/.factory/storage"),
        description="Where local artifacts and logs live; local refs must stay inside it.",
    )
    default_executor_model: str = Field(default=DEFAULT_MODEL)
    default_evaluator_model: str = Field(default=DEFAULT_MODEL)
    default_image_model: str = Field(default="fal:fal-ai/flux/schnell")
    default_audio_model: str = Field(default="tts-1")
    default_video_model: str = Field(default="fal:fal-ai/kling-video/v4/text-to-video")
    transcription_model: str = Field(
        default="whisper-1", description="OpenAI model that transcribes generated audio for the evaluator."
    )
    fal_url: str = Field(default="https://fal.run", description="fal's synchronous endpoint host.")
    fal_queue_url: str = Field(default="https://queue.fal.run", description="fal's queue host (video).")
    elevenlabs_url: str = Field(default="https://api.elevenlabs.io")
    gpu_pool: str = Field(default="factory-gpu", description="The `runpod` work pool GPU generation runs on.")
    gpu_timeout_s: int = Field(
        default=600, ge=10, le=86_400,
        description="Longest one GPU generation may run; bounds its worst-case cost and the wait for it.",
    )
    media_width: int = Field(default=1024, ge=64, le=4096, description="Width of generated images and video.")
    media_height: int = Field(default=1024, ge=64, le=4096, description="Height of generated images and video.")
    media_seconds: int = Field(default=5, ge=1, le=60, description="Length of generated video and music.")
    gpu_local: bool = Field(
        default=False, description="This process has the GPU (the RunPod image): run GPU models here, not on the pool."
    )
    models_dir: Path = Field(
        default=Path("/runpod-volume/models"),
        description="Where `diffusers:<relative path>` models live (RunPod mounts network volumes at /runpod-volume).",
    )
    preload_models: str = Field(default="", description="Comma-separated diffusers models to load at worker start.")
    diffusers_steps: int | None = Field(
        default=None, ge=1, le=500, description="num_inference_steps for diffusers; unset: each pipeline's default."
    )
    video_frames: int = Field(default=6, ge=1, le=20, description="Frames of a video the evaluator is shown.")
    s3_block: str = Field(default="factory-s3", description="The prefect-aws S3Bucket block for s3:// refs.")
    storage_retry_window_s: float = Field(
        default=30.0, ge=0, description="How long an S3 read or write is retried before the write is spooled."
    )
    prices_file: Path | None = Field(
        default=None, description="A JSON file of extra or overriding prices, same shape as prices.json."
    )
    prices: str | None = Field(default=None, description="The same as `prices_file`, inline JSON.")
    executor_max_tokens: int = Field(default=8192, ge=16, le=20000)
    evaluator_max_tokens: int = Field(default=4096, ge=256, le=20000)
    request_timeout_s: float = Field(default=600.0, gt=0, description="Upper bound on one provider call.")
    retries: int = Field(default=4, ge=0, le=10, description="Task retries on transient provider faults.")
    retry_delay_s: float = Field(
        default=2.0, ge=0, description="First retry delay of provider calls and callbacks; doubles each retry.")
    retry_after_cap_s: float = Field(default=60.0, ge=0, description="Longest `retry-after` honoured.")
    callback_allowed_hosts: str = Field(
        default="", description="Comma-separated host names, IPs or CIDR networks a `callback_url` may reach although "
        "they are loopback, private, link-local or otherwise not public (e.g. `hooks.internal,10.2.0.0/16`).")
    callback_retry_window_s: float = Field(
        default=60.0, gt=0, le=3600, description="How long a callback is retried (connection errors, timeouts, "
        "429, 5xx) before it is given up; the job's own end never waits longer.")
    allow_code_checks: bool = Field(
        default=False, description="Let jobs run `python` checks: pytest on model-written code, in a sandbox on this "
        "worker. Off: a job with one is refused before any call.")
    plateau_min_gain: float = Field(
        default=0.02, ge=0, le=1, description="The rise in best confidence that counts as progress for "
        "`limits.patience`.")
    provider_limits: bool = Field(
        default=False, description="Every provider call first takes a slot of Prefect's global concurrency limit "
        "`factory-<provider>` (calls in flight) and rate limit `factory-<provider>-per-minute`, where the operator "
        "created them (`prefect gcl create`); shared by every worker and pool. Off: one fewer API round trip a call.")
    secret_ttl_s: float = Field(
        default=300.0, ge=0, le=86_400, description="How long a worker keeps a provider key read from its Secret block "
        "before reading it again: a rotated key reaches a long-running worker within this time. A key not found is "
        "never kept, so a block created after a refused job serves the next one.")
    callback_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Longest one callback attempt may take, cut to what is left of "
        "the retry window.")


@lru_cache(maxsize=1)
def get_settings() -> FactorySettings:
    """The process's settings, read from the environment on first use."""
    return FactorySettings()
