"""A loopback emulator of fal (synchronous host, queue, file CDN) and ElevenLabs text-to-speech, with real media.

One server stands for every host: `/fal` for fal.run, `/fal-queue` for queue.fal.run, `/files` for fal's CDN,
`/elevenlabs` for api.elevenlabs.io; the `media_api` fixture points FACTORY_FAL_URL, FACTORY_FAL_QUEUE_URL and
FACTORY_ELEVENLABS_URL at them. Images are PNGs (Pillow), video MP4 and speech MP3 (PyAV), so a prober reads them.

A test scripts faults per request in arrival order (429 with retry-after, 500, 401, 400, malformed bodies, hangs),
how many polls a queued request spends IN_QUEUE and IN_PROGRESS, and reads every request (`requests`) and what each
finished call billed (`billed`, in `Usage` field names). Run it alone: `python -m tests.emulators.media --port 8090`.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import io
import itertools
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import av
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.emulators.server import ThreadedServer

FAL_KEY = "fal-test-emulator-key-id:fal-test-emulator-secret"
ELEVENLABS_KEY = "xi-test-emulator-key"
SAMPLE_RATE = 24_000
VIDEO_FPS = 8
VIDEO_SIZES = {"16:9": (320, 180), "9:16": (180, 320), "1:1": (240, 240)}  # small: the prober needs frames, not 720p
MEGAPIXEL = 2**20


# --- real media ---------------------------------------------------------------------------------
def png_bytes(width: int, height: int) -> bytes:
    """A gradient PNG of exactly this size."""
    x = np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8), (height, width))
    y = np.broadcast_to(np.linspace(0, 255, height, dtype=np.uint8)[:, None], (height, width))
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([x, y, np.full_like(x, 128)])).save(buffer, format="PNG")
    return buffer.getvalue()


def speech_seconds(text: str) -> float:
    """How long the emulated speech for `text` lasts: about a word a third of a second, as a voice would."""
    return round(0.5 + 0.06 * len(text), 2)


def mp3_bytes(seconds: float, frequency: float = 440.0) -> bytes:
    """A mono sine of `seconds`, MP3-encoded."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=SAMPLE_RATE, layout="mono")
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        wave = (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        for packet in itertools.chain(stream.encode(frame), stream.encode(None)):
            container.mux(packet)
    return buffer.getvalue()


def mp4_bytes(width: int, height: int, seconds: float) -> bytes:
    """An H.264 MP4 of `seconds` at VIDEO_FPS, a gradient that moves frame by frame."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
        for n in range(round(seconds * VIDEO_FPS)):
            shade = ((x + 8 * n) % 256).astype(np.uint8)
            rgb = np.dstack([shade, np.full_like(shade, 64), 255 - shade])
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


# --- the emulator ---------------------------------------------------------------------------------
@dataclass
class MediaBilled:
    api: str
    model: str
    usage: dict[str, Any]  # `factory.models.Usage` field names -> units, e.g. {"megapixels": 1, "images": 1}


@dataclass
class MediaScript:
    """What the emulator answers. Faults apply to requests in arrival order; None answers normally."""

    faults: list[str | None] = field(default_factory=list)  # "429", "500", "401", "400", "malformed", "hang"
    retry_after: str = "0"  # the `retry-after` header sent with a 429
    hang_s: float = 3600.0
    latency_s: float = 0.0
    queue_polls: int = 1  # status polls a queued request answers IN_QUEUE, then ...
    progress_polls: int = 1  # ... IN_PROGRESS, then `final_status`
    final_status: str = "COMPLETED"
    data_uri: bool = False  # fal answers with the image inline, as with `sync_mode`
    character_cost: int | None = None  # ElevenLabs' `character-cost`; None: the text's length
    send_character_cost: bool = True
    bad_character_costs: int = 0  # the first N ElevenLabs replies say `character-cost: n/a` (billed all the same)
    corrupt_renders: int = 0  # the first N media made are billed but do not decode (a truncated PNG or MP4)


@dataclass
class QueuedJob:
    id: str
    endpoint: str
    body: dict[str, Any]
    polls: int = 0
    status: str = "IN_QUEUE"
    result: dict[str, Any] | None = None


class MediaEmulator:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.url = ""  # set by `serve`
        self.reset()
        self.app = Starlette(routes=[
            Route("/fal-queue/{endpoint:path}/requests/{job_id}/status", self.fal_status, methods=["GET"]),
            Route("/fal-queue/{endpoint:path}/requests/{job_id}/cancel", self.fal_cancel, methods=["PUT"]),
            Route("/fal-queue/{endpoint:path}/requests/{job_id}", self.fal_result, methods=["GET"]),
            Route("/fal-queue/{endpoint:path}", self.fal_submit, methods=["POST"]),
            Route("/fal/{endpoint:path}", self.fal_run, methods=["POST"]),
            Route("/files/{name}", self.file, methods=["GET"]),
            Route("/elevenlabs/v1/text-to-speech/{voice_id}", self.elevenlabs_tts, methods=["POST"]),
        ])

    def reset(self, script: MediaScript | None = None) -> MediaScript:
        with self._lock:
            self.script = script or MediaScript()
            self.requests: list[dict[str, Any]] = []
            self.billed: list[MediaBilled] = []
            self.faults_sent: list[str] = []
            self.jobs: dict[str, QueuedJob] = {}
            self.cancelled: list[str] = []
            self.files: dict[str, tuple[bytes, str]] = {}
            self._fault_iter = iter(self.script.faults)
            self._renders_left_to_corrupt = self.script.corrupt_renders
            self._bad_costs_left = self.script.bad_character_costs
        return self.script

    def environ(self) -> dict[str, str]:
        """The variables that point the Factory's media generators at this emulator."""
        return {"FACTORY_FAL_URL": f"{self.url}/fal", "FACTORY_FAL_QUEUE_URL": f"{self.url}/fal-queue",
                "FACTORY_ELEVENLABS_URL": f"{self.url}/elevenlabs", "FAL_KEY": FAL_KEY,
                "ELEVENLABS_API_KEY": ELEVENLABS_KEY}

    # --- scripting ---------------------------------------------------------------------------
    async def _prelude(self, request: Request, api: str) -> tuple[dict[str, Any] | None, Response | None]:
        raw = await request.body()
        body = await request.json() if raw and request.headers.get("content-type", "").startswith(
            "application/json") else None
        self.requests.append({"api": api, "method": request.method, "path": request.url.path,
                              "query": dict(request.query_params), "body": body, "headers": dict(request.headers),
                              "at": time.monotonic()})
        if self.script.latency_s:
            await asyncio.sleep(self.script.latency_s)
        with self._lock:
            fault = next(self._fault_iter, None)
        if fault:
            self.faults_sent.append(fault)
            return body, await self._fault(fault, api)
        if not self._authorized(request, api):
            return body, self._error(401, api, "invalid_api_key", "Invalid API key")
        return body, None

    @staticmethod
    def _authorized(request: Request, api: str) -> bool:
        if api == "elevenlabs":
            return request.headers.get("xi-api-key") == ELEVENLABS_KEY
        return api == "files" or request.headers.get("authorization") == f"Key {FAL_KEY}"

    async def _fault(self, kind: str, api: str) -> Response:
        if kind == "hang":
            await asyncio.sleep(self.script.hang_s)
            return self._error(504, api, "timeout", "emulated hang")
        if kind == "malformed":
            return Response('{"images": [{"url": ', media_type="application/json")
        status = int(kind)
        headers = {"retry-after": self.script.retry_after} if status == 429 else {}
        return self._error(status, api, f"emulated_{status}", f"emulated HTTP {status}", headers)

    @staticmethod
    def _error(status: int, api: str, code: str, message: str, headers: dict | None = None) -> Response:
        detail = {"status": code, "message": message} if api == "elevenlabs" else message
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def _host(self, request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    # --- fal -----------------------------------------------------------------------------------
    def _render(self, request: Request, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """Make the media an endpoint would, store it on the CDN, bill it, and return fal's reply."""
        if "video" in endpoint:
            width, height = VIDEO_SIZES.get(body.get("aspect_ratio", "16:9"), VIDEO_SIZES["16:9"])
            seconds = int(body.get("duration", "5"))
            url = self._store(request, self._maybe_corrupt(mp4_bytes(width, height, seconds)), "video/mp4", "mp4")
            self._bill("fal", f"fal:{endpoint}", media_seconds=Decimal(seconds))
            return {"video": {"url": url, "content_type": "video/mp4", "file_name": url.rsplit("/", 1)[1]}}
        size = body.get("image_size")
        width, height = (size["width"], size["height"]) if isinstance(size, dict) else (1024, 768)
        data = self._maybe_corrupt(png_bytes(width, height))
        url = (f"data:image/png;base64,{base64.b64encode(data).decode()}" if self.script.data_uri
               else self._store(request, data, "image/png", "png"))
        self._bill("fal", f"fal:{endpoint}", images=1, megapixels=math.ceil(width * height / MEGAPIXEL))
        return {"images": [{"url": url, "width": width, "height": height, "content_type": "image/png"}],
                "timings": {"inference": 0.01}, "seed": body.get("seed", 42), "has_nsfw_concepts": [False],
                "prompt": body.get("prompt", "")}

    async def fal_run(self, request: Request) -> Response:
        body, fault = await self._prelude(request, "fal")
        if fault is not None:
            return fault
        if not body or not body.get("prompt"):
            return JSONResponse({"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}, status_code=422)
        return JSONResponse(self._render(request, request.path_params["endpoint"], body))

    async def fal_submit(self, request: Request) -> Response:
        body, fault = await self._prelude(request, "fal-queue")
        if fault is not None:
            return fault
        endpoint = request.path_params["endpoint"]
        job = QueuedJob(id=str(uuid.uuid4()), endpoint=endpoint, body=body or {})
        self.jobs[job.id] = job
        base = f"{self._host(request)}/fal-queue/{endpoint}/requests/{job.id}"
        return JSONResponse({"request_id": job.id, "status": "IN_QUEUE", "queue_position": 0, "response_url": base,
                             "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"})

    async def fal_status(self, request: Request) -> Response:
        _, fault = await self._prelude(request, "fal-queue")
        if fault is not None:
            return fault
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        if job.status in ("IN_QUEUE", "IN_PROGRESS"):
            job.polls += 1
            script = self.script
            job.status = ("IN_QUEUE" if job.polls <= script.queue_polls else "IN_PROGRESS"
                          if job.polls <= script.queue_polls + script.progress_polls else script.final_status)
            if job.status == "COMPLETED":
                job.result = self._render(request, job.endpoint, job.body)
        return JSONResponse({"status": job.status, "request_id": job.id, "queue_position": 0,
                             "response_url": str(request.url).rsplit("/status", 1)[0]},
                            status_code=200 if job.status == "COMPLETED" else 202)

    async def fal_result(self, request: Request) -> Response:
        _, fault = await self._prelude(request, "fal-queue")
        if fault is not None:
            return fault
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        if job.result is None:
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        return JSONResponse(job.result)

    async def fal_cancel(self, request: Request) -> Response:
        _, fault = await self._prelude(request, "fal-queue")
        if fault is not None:
            return fault
        job_id = request.path_params["job_id"]
        self.cancelled.append(job_id)
        if job_id in self.jobs and self.jobs[job_id].result is None:
            self.jobs[job_id].status = "CANCELLED"
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    async def file(self, request: Request) -> Response:
        _, fault = await self._prelude(request, "files")
        if fault is not None:
            return fault
        stored = self.files.get(request.path_params["name"])
        if stored is None:
            return Response("Not Found", status_code=404, media_type="text/plain")
        return Response(stored[0], media_type=stored[1])

    def _store(self, request: Request, data: bytes, media_type: str, suffix: str) -> str:
        name = f"{uuid.uuid4().hex}.{suffix}"
        self.files[name] = (data, media_type)
        return f"{self._host(request)}/files/{name}"

    def _maybe_corrupt(self, data: bytes) -> bytes:
        with self._lock:
            if self._renders_left_to_corrupt <= 0:
                return data
            self._renders_left_to_corrupt -= 1
        return data[:len(data) // 3]

    def _bill(self, api: str, model: str, **usage: Any) -> None:
        with self._lock:
            self.billed.append(MediaBilled(api, model, usage))

    # --- ElevenLabs ----------------------------------------------------------------------------
    async def elevenlabs_tts(self, request: Request) -> Response:
        body, fault = await self._prelude(request, "elevenlabs")
        if fault is not None:
            return fault
        text = (body or {}).get("text")
        if not text or not body.get("model_id"):
            return self._error(422, "elevenlabs", "invalid_request", "`text` and `model_id` are required")
        cost = self.script.character_cost if self.script.character_cost is not None else len(text)
        self._bill("elevenlabs", f"elevenlabs:{body['model_id']}", characters=cost)
        headers = {"request-id": uuid.uuid4().hex}
        if self.script.send_character_cost:
            headers["character-cost"] = str(cost)
            with self._lock:
                if self._bad_costs_left > 0:
                    self._bad_costs_left -= 1
                    headers["character-cost"] = "n/a"
        return Response(mp3_bytes(speech_seconds(text)), media_type="audio/mpeg", headers=headers)


_served: MediaEmulator | None = None


def serve() -> MediaEmulator:
    """The process's emulator on a free loopback port: started on first use, stopped at exit."""
    global _served
    if _served is None:
        emulator = MediaEmulator()
        server = ThreadedServer(emulator.app).start()
        atexit.register(server.stop)
        emulator.url, _served = server.url, emulator
    return _served


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    emulator = MediaEmulator()
    emulator.url = f"http://127.0.0.1:{args.port}"
    uvicorn.run(emulator.app, host="127.0.0.1", port=args.port)
