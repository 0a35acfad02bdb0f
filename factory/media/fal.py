"""fal.ai media generation over its HTTP API: images from the synchronous host, video through the queue.

Models are named `fal:<endpoint>` (`fal:fal-ai/flux/schnell`, `fal:fal-ai/kling-video/v4/text-to-video`); the key
is `FAL_KEY` or the Secret block `fal-api-key`, and `FACTORY_FAL_URL` / `FACTORY_FAL_QUEUE_URL` move the hosts::

    generator = FalGenerator(SecretStr(os.environ["FAL_KEY"]))
    result = await generator.generate(MediaRequest(kind="image", model="fal-ai/flux/schnell", prompt="a fox"),
                                      timeout_s=120)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import httpx
from pydantic import Field, SecretStr

from factory.errors import ProviderAuthError, ProviderError, ProviderRequestError, TransientProviderError
from factory.media.base import MediaGenerator, MediaKind, MediaRequest, MediaResult
from factory.media.http import Reply, deadline, fetch_media, parse, send
from factory.models import Usage
from factory.settings import get_settings

POLL_INTERVAL_S = 1.0
CANCEL_TIMEOUT_S = 5.0
# Reads of a submitted request (status, result, file) retried in place before the fault goes to the task.
READ_ATTEMPTS = 5
MEGAPIXEL = 2**20
# fal snaps sizes to a multiple of up to 64 px, which may round up: the bound prices the snapped size.
SIZE_STEP = 64
PENDING = frozenset({"IN_QUEUE", "IN_PROGRESS"})

T = TypeVar("T")
ReplyT = TypeVar("ReplyT", bound=Reply)


class _File(Reply):
    url: str
    content_type: str | None = None
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)


class _Images(Reply):
    images: list[_File] = Field(min_length=1)


class _Video(Reply):
    video: _File


class _Queued(Reply):
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str | None = None


class _Status(Reply):
    status: str


class FalGenerator(MediaGenerator):
    """Images (`images[0]` of the endpoint's reply) and video (`video`) from fal; no audio."""

    name = "fal"

    def __init__(self, api_key: SecretStr | None, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        # The key goes on API calls only, not on the client: result files live on a CDN that must not see it.
        self._auth = {"Authorization": f"Key {api_key.get_secret_value()}"} if api_key else None
        self._poll_interval_s = poll_interval_s
        self._client = httpx.AsyncClient(follow_redirects=True)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def generate(self, request: MediaRequest, *, timeout_s: float) -> MediaResult:
        """An image (synchronous endpoint) or a video (queued and polled) from the fal endpoint `request.model`."""
        if request.kind is MediaKind.AUDIO:
            raise ProviderRequestError(request.model, "fal makes images and video here, not audio; use e.g. "
                                                      "'tts-1' or 'elevenlabs:eleven_multilingual_v2'.")
        if self._auth is None:
            raise ProviderAuthError(request.model, "no fal API key: set FAL_KEY or create the Secret block "
                                                   "'fal-api-key' (python -m blocks.register).")
        if request.kind is MediaKind.IMAGE:
            return await self._image(request, timeout_s)
        return await self._video(request, timeout_s)

    def usage_bound(self, request: MediaRequest) -> Usage:
        """A video's seconds, or an image's megapixels at its size rounded up to fal's `SIZE_STEP`."""
        if request.kind is MediaKind.VIDEO:
            return Usage(media_seconds=Decimal(request.duration_s))
        width, height = (-(-side // SIZE_STEP) * SIZE_STEP for side in (request.width, request.height))
        return Usage(images=1, megapixels=_megapixels(width, height))

    async def _image(self, request: MediaRequest, timeout_s: float) -> MediaResult:
        size = {"width": request.width, "height": request.height}
        body: dict[str, Any] = {"prompt": request.prompt, "image_size": size, "num_images": 1, "output_format": "png"}
        if request.seed is not None:
            body["seed"] = request.seed
        url = f"{get_settings().fal_url.rstrip('/')}/{request.model}"
        ends = asyncio.get_running_loop().time() + timeout_s
        async with deadline(request.model, timeout_s):
            image = parse(await self._call("POST", url, request.model, timeout_s, json=body), _Images,
                          request.model).images[0]
        usage = Usage(images=1, megapixels=_megapixels(image.width or request.width, image.height or request.height))
        try:  # the image is made and billed: a failed download must still be counted
            async with deadline(request.model, ends - asyncio.get_running_loop().time()):
                data, media_type = await self._patiently(
                    lambda: fetch_media(self._client, image.url, model=request.model, timeout_s=timeout_s))
        except ProviderError as exc:
            raise TransientProviderError(request.model, f"the image was made but could not be fetched ({exc})",
                                         billed=usage) from exc
        return MediaResult(data=data, media_type=image.content_type or media_type or "image/png", usage=usage,
                           model=request.model)

    async def _video(self, request: MediaRequest, timeout_s: float) -> MediaResult:
        body = {"prompt": request.prompt, "duration": str(request.duration_s),
                "aspect_ratio": _aspect_ratio(request.width, request.height)}
        url = f"{get_settings().fal_queue_url.rstrip('/')}/{request.model}"
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout_s
        async with deadline(request.model, timeout_s):
            queued = parse(await self._call("POST", url, request.model, timeout_s, json=body), _Queued, request.model)
        usage = Usage(media_seconds=Decimal(request.duration_s))
        completed = False
        try:
            async with asyncio.timeout_at(ends):
                await self._wait(queued, request.model, timeout_s)
                completed = True
                video = await self._patiently(lambda: self._read(queued.response_url, _Video, request.model,
                                                                 timeout_s))
                data, media_type = await self._patiently(
                    lambda: fetch_media(self._client, video.video.url, model=request.model, timeout_s=timeout_s))
        except TimeoutError as exc:
            await self._cancel(queued, request.model)
            raise TransientProviderError(request.model, f"request {queued.request_id} was not done within "
                                                        f"{timeout_s:g}s; it was cancelled", billed_unknown=True,
                                         billed=usage if completed else None) from exc
        except ProviderError as exc:  # a completed video is billed; an unfinished one may be
            raise TransientProviderError(request.model, f"request {queued.request_id}: {exc}",
                                         billed=usage if completed else None, billed_unknown=True) from exc
        return MediaResult(data=data, media_type=video.video.content_type or media_type or "video/mp4",
                           usage=usage, model=request.model)

    async def _wait(self, queued: _Queued, model: str, timeout_s: float) -> None:
        while True:
            status = (await self._patiently(lambda: self._read(queued.status_url, _Status, model, timeout_s))).status
            if status == "COMPLETED":
                return
            if status not in PENDING:
                raise TransientProviderError(model, f"request {queued.request_id} reported status '{status}'; "
                                                    f"expected IN_QUEUE, IN_PROGRESS or COMPLETED")
            await asyncio.sleep(self._poll_interval_s)

    async def _patiently(self, read: Callable[[], Awaitable[T]]) -> T:
        """Read a submitted request's status or result, riding out a few transient faults: the request is already
        paid for, and a retry from the top (the task's) would pay for it again."""
        for _ in range(READ_ATTEMPTS - 1):
            try:
                return await read()
            except TransientProviderError as exc:
                await asyncio.sleep(max(self._poll_interval_s, exc.retry_after_s or 0.0))
        return await read()

    async def _read(self, url: str, shape: type[ReplyT], model: str, timeout_s: float) -> ReplyT:
        return parse(await self._call("GET", url, model, timeout_s), shape, model)

    async def _cancel(self, queued: _Queued, model: str) -> None:
        # Best effort: a request left running would still be billed when it completes.
        if queued.cancel_url is None:
            return
        try:
            await self._call("PUT", queued.cancel_url, model, CANCEL_TIMEOUT_S)
        except ProviderError:
            pass  # the timeout being reported matters more than the cancel

    async def _call(self, method: str, url: str, model: str, timeout_s: float, **kwargs: Any) -> httpx.Response:
        return await send(self._client, method, url, model=model, timeout_s=timeout_s, headers=self._auth, **kwargs)


def _megapixels(width: int, height: int) -> int:
    """Billed megapixels of one image: fal rounds each image up to the whole megapixel."""
    return -(-(width * height) // MEGAPIXEL)


def _aspect_ratio(width: int, height: int) -> str:
    return "16:9" if width > height else "9:16" if height > width else "1:1"
