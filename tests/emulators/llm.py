"""A loopback emulator of the Anthropic Messages and OpenAI Chat Completions HTTP APIs, and OpenAI's media routes.

The official SDKs reach it through ANTHROPIC_BASE_URL / OPENAI_BASE_URL. A test scripts it:
what the executor writes, what verdicts the evaluator returns (dicts, raw text, empty),
latency, and faults (429 with retry-after, 500, 529 overloaded, malformed bodies, hangs, 401).
Every request is recorded with the usage it was billed, so tests can check money to the token. OpenAI's
images, speech and transcriptions (`openai_media.py`) share the script, faults and record; they bill into
`media_billed`.

Run it alone with `python -m tests.emulators.llm --port 8089` to point a real job at it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.emulators.media import MediaBilled
from tests.emulators.openai_media import OpenAIMediaRoutes

API_KEY = "sk-ant-test-emulator-key"
OPENAI_KEY = "sk-openai-test-emulator-key"
FAULT_KINDS = ("429", "500", "529", "malformed")
# Faults of a reply the provider made and billed: a garbled body, one without `content` (or `choices`), one without
# `usage`, one that trickles in a byte at a time. Any other fault is refused before any work, and bills nothing.
BILLED_FAULTS = frozenset({"malformed", "no_content", "no_usage", "trickle"})


@dataclass
class Billed:
    api: str
    role: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    prompt: str = ""
    usage_known: bool = True  # False: the client could not read what this reply billed (garbled, no usage, cut)


@dataclass
class Script:
    """What the emulator answers. Lists are consumed in order; the last item repeats."""

    executor: list[str] = field(default_factory=lambda: ["Draft {n}: an artifact."])
    verdicts: list[Any] = field(default_factory=lambda: [{"converged": True, "confidence": 0.9, "strengths": ["ok"],
                                                          "weaknesses": [], "feedback_for_executor": ""}])
    latency_s: float = 0.0
    faults: list[str | None] = field(default_factory=list)  # per request, in order: None = answer normally
    fault_rate: float = 0.0
    fault_seed: int = 7
    hang_s: float = 3600.0
    cached_tokens: int = 0  # reported as cache reads on OpenAI / Anthropic
    on_request: Any = None  # called with each request's index before it is answered
    retry_after: str = "0"  # the `retry-after` header sent with a 429
    omit_usage: bool = False  # OpenAI replies carry no `usage`, as some OpenAI-compatible servers do
    trickle_s: float = 1.0  # the pause between the bytes of a "trickle" reply
    transcript: str = "An emulated transcript."  # what /v1/audio/transcriptions hears


class Emulator(OpenAIMediaRoutes):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()
        self.app = Starlette(routes=[
            Route("/v1/messages", self.anthropic_messages, methods=["POST"]),
            Route("/v1/chat/completions", self.openai_chat, methods=["POST"]),
            *self.media_routes(),
        ])

    def reset(self, script: Script | None = None) -> Script:
        with self._lock:
            self.script = script or Script()
            self.requests: list[dict[str, Any]] = []
            self.billed: list[Billed] = []
            self.media_billed: list[MediaBilled] = []
            self.faults_sent: list[str] = []
            self.trickles_finished = 0
            self._counters = {"executor": itertools.count(), "evaluator": itertools.count()}
            self._fault_iter = iter(self.script.faults)
            self._rng = random.Random(self.script.fault_seed)
        return self.script

    # --- scripting -------------------------------------------------------------------------
    def _next_fault(self) -> str | None:
        with self._lock:
            scripted = next(self._fault_iter, None)
            if scripted:
                return scripted
            if self.script.fault_rate and self._rng.random() < self.script.fault_rate:
                return self._rng.choice(FAULT_KINDS)
        return None

    def _next(self, role: str) -> tuple[int, Any]:
        with self._lock:
            n = next(self._counters[role])
        items = self.script.executor if role == "executor" else self.script.verdicts
        return n, items[min(n, len(items) - 1)]

    async def _prelude(self, request: Request, api: str,
                       body: dict[str, Any] | None = None) -> tuple[dict[str, Any], Response | None]:
        body, fault = await self._arrive(request, api, body)
        return body, (await self._fault(fault, api) if fault else None)

    async def _chat_prelude(self, request: Request, api: str) -> tuple[dict[str, Any], Response | None, str | None]:
        """As `_prelude`, but a fault of a billed reply is left to `_deliver`, after the reply is made and billed."""
        body, fault = await self._arrive(request, api)
        if api == "openai" and self.script.omit_usage and not fault:
            fault = "no_usage"
        if fault in BILLED_FAULTS:
            return body, None, fault
        return body, (await self._fault(fault, api) if fault else None), None

    async def _arrive(self, request: Request, api: str,
                      body: dict[str, Any] | None = None) -> tuple[dict[str, Any], str | None]:
        body = await request.json() if body is None else body  # a multipart upload comes already read
        self.requests.append({"api": api, "path": request.url.path, "body": body, "headers": dict(request.headers),
                              "at": time.monotonic()})
        if self.script.on_request is not None:
            await asyncio.to_thread(self.script.on_request, len(self.requests) - 1)
        if self.script.latency_s:
            await asyncio.sleep(self.script.latency_s)
        fault = self._next_fault()
        if fault:
            self.faults_sent.append(fault)
        return body, fault

    def _deliver(self, payload: dict[str, Any], fault: str | None, billed: Billed) -> Response:
        """The reply, as the fault says it arrives; what the client cannot read of its usage is marked."""
        billed.usage_known = fault in (None, "no_content")
        if fault is None:
            return JSONResponse(payload)
        if fault == "malformed":
            return Response(json.dumps(payload)[:40], media_type="application/json")
        if fault in ("no_content", "no_usage"):
            dropped = {"no_content": ("content", "choices"), "no_usage": ("usage",)}[fault]
            return JSONResponse({k: v for k, v in payload.items() if k not in dropped})
        body = json.dumps(payload).encode()

        async def trickle():
            for index in range(len(body)):
                yield body[index:index + 1]
                await asyncio.sleep(self.script.trickle_s)
            self.trickles_finished += 1

        return StreamingResponse(trickle(), media_type="application/json")

    async def _fault(self, kind: str, api: str) -> Response:
        if kind == "hang":
            await asyncio.sleep(self.script.hang_s)
        if kind == "malformed":
            return Response('{"id": "msg_1", "content": [', media_type="application/json")
        status = {"429": 429, "500": 500, "529": 529, "401": 401, "400": 400}[kind]
        kind_name = {429: "rate_limit_error", 500: "api_error", 529: "overloaded_error", 401: "authentication_error",
                     400: "invalid_request_error"}[status]
        headers = {"retry-after": self.script.retry_after} if status == 429 else {}
        if api == "anthropic":
            body = {"type": "error", "error": {"type": kind_name, "message": f"emulated {kind_name}"}}
        else:
            body = {"error": {"message": f"emulated {kind_name}", "type": kind_name, "code": None, "param": None}}
        return JSONResponse(body, status_code=status, headers=headers)

    # --- Anthropic -------------------------------------------------------------------------
    async def anthropic_messages(self, request: Request) -> Response:
        # Anthropic takes the key as `x-api-key` or (SDK 2.x) as a bearer token.
        if API_KEY not in (request.headers.get("x-api-key"), request.headers.get("authorization", "")[7:]):
            return JSONResponse({"type": "error", "error": {"type": "authentication_error",
                                                            "message": "invalid x-api-key"}}, status_code=401)
        body, fault, billed_fault = await self._chat_prelude(request, "anthropic")
        if fault is not None:
            return fault
        role = "evaluator" if body.get("tools") else "executor"
        n, item = self._next(role)
        content, out_text = self._anthropic_content(role, n, item)
        usage = self._bill("anthropic", role, body["model"], _prompt_text(body), out_text)
        return self._deliver({
            "id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": "tool_use" if any(c["type"] == "tool_use" for c in content)
            else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": usage.cache_read_tokens},
        }, billed_fault, usage)

    def _anthropic_content(self, role: str, n: int, item: Any) -> tuple[list[dict], str]:
        if role == "executor":
            text = item.format(n=n + 1)
            return [{"type": "text", "text": text}], text
        if isinstance(item, dict):
            return [{"type": "tool_use", "id": f"toolu_{n}", "name": "submit_verdict", "input": item}], json.dumps(item)
        return ([{"type": "text", "text": item}] if item else []), item

    # --- OpenAI ----------------------------------------------------------------------------
    @staticmethod
    def _openai_denied(request: Request) -> Response | None:
        if request.headers.get("authorization") == f"Bearer {OPENAI_KEY}":
            return None
        return JSONResponse({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                       "code": "invalid_api_key", "param": None}}, status_code=401)

    async def openai_chat(self, request: Request) -> Response:
        if (denied := self._openai_denied(request)) is not None:
            return denied
        body, fault, billed_fault = await self._chat_prelude(request, "openai")
        if fault is not None:
            return fault
        role = "evaluator" if body.get("response_format") else "executor"
        n, item = self._next(role)
        text = item.format(n=n + 1) if role == "executor" else (json.dumps(item) if isinstance(item, dict) else item)
        usage = self._bill("openai", role, body["model"], _prompt_text(body), text)
        prompt_tokens = usage.input_tokens + usage.cache_read_tokens
        return self._deliver({
            "id": f"chatcmpl-{uuid.uuid4().hex[:20]}", "object": "chat.completion", "created": 1764000000,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": usage.output_tokens,
                      "total_tokens": prompt_tokens + usage.output_tokens,
                      "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens}},
        }, billed_fault, usage)

    def _bill(self, api: str, role: str, model: str, prompt: str, output: str) -> Billed:
        total_in = len(prompt) // 4 + 10
        cached = min(self.script.cached_tokens, total_in)
        billed = Billed(api, role, model, total_in - cached, len(output) // 4 + 5, cached, prompt)
        self.billed.append(billed)
        return billed


def _prompt_text(body: dict[str, Any]) -> str:
    parts = [json.dumps(body.get("system", ""))]
    parts += [json.dumps(_billable(m.get("content"))) for m in body.get("messages", [])]
    parts.append(json.dumps(body.get("tools") or body.get("response_format") or ""))
    return "".join(parts)


def _billable(content: Any) -> Any:
    """Content as billed: an image costs its pixels / 750 tokens (Anthropic's published rule), not its base64."""
    if not isinstance(content, list):
        return content
    return [("x" * 4 * _image_tokens(part)) if part.get("type") in ("image", "image_url") else part
            for part in content]


def _image_tokens(part: dict[str, Any]) -> int:
    data = part["source"]["data"] if part["type"] == "image" else part["image_url"]["url"].split(",", 1)[1]
    width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
    return math.ceil(width * height / 750)


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args()
    uvicorn.run(Emulator().app, host="127.0.0.1", port=args.port)
