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
import hashlib
import io
import itertools
import json
import math
import os
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
# Prompt caching as the APIs document it: Anthropic caches the prefix up to a `cache_control` block (tools, system,
# messages, in that order) for 5 minutes when it is at least its model's minimum; OpenAI caches any prompt of
# 1,024 tokens or more by itself and reports the cached prefix in 128-token steps.
CACHE_MIN_TOKENS = 1024
CACHE_TTL_S = 300.0
OPENAI_CACHE_STEP = 128


@dataclass
class Billed:
    api: str
    role: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    prompt: str = ""
    cache_write_tokens: int = 0  # Anthropic's 5-minute cache writes
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
    judge: Any = None  # given the evaluator's request text, the verdict to answer (instead of `verdicts`)


class Emulator(OpenAIMediaRoutes):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()
        self.app = Starlette(routes=[
            Route("/v1/messages", self._counted(self.anthropic_messages), methods=["POST"]),
            Route("/v1/chat/completions", self._counted(self.openai_chat), methods=["POST"]),
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
            self.open_calls = 0  # chat requests being answered now
            self.most_open_calls = 0  # the most at once since the reset
            self._anthropic_cache: dict[tuple[str, str], float] = {}  # (model, prefix hash) -> expiry
            self._openai_prompts: dict[tuple[str, str | None], list[str]] = {}
            self._counters = {"executor": itertools.count(), "evaluator": itertools.count()}
            self._fault_iter = iter(self.script.faults)
            self._rng = random.Random(self.script.fault_seed)
        return self.script

    def _counted(self, handler: Any) -> Any:
        """`handler`, counting the chat requests open at once (a provider's calls in flight)."""
        async def counted(request: Request) -> Response:
            with self._lock:
                self.open_calls += 1
                self.most_open_calls = max(self.most_open_calls, self.open_calls)
            try:
                return await handler(request)
            finally:
                with self._lock:
                    self.open_calls -= 1
        return counted

    # --- scripting -------------------------------------------------------------------------
    def _next_fault(self) -> str | None:
        with self._lock:
            scripted = next(self._fault_iter, None)
            if scripted:
                return scripted
            if self.script.fault_rate and self._rng.random() < self.script.fault_rate:
                return self._rng.choice(FAULT_KINDS)
        return None

    def _next(self, role: str, body: dict[str, Any]) -> tuple[int, Any]:
        with self._lock:
            n = next(self._counters[role])
        if role == "evaluator" and self.script.judge is not None:
            return n, self.script.judge(_prompt_text(body))
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
        n, item = self._next(role, body)
        content, out_text = self._anthropic_content(role, n, item)
        usage = self._bill("anthropic", role, body["model"], _prompt_text(body), out_text,
                           cache=lambda total: self._anthropic_cached(body, total))
        return self._deliver({
            "id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": "tool_use" if any(c["type"] == "tool_use" for c in content)
            else "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                      "cache_creation_input_tokens": usage.cache_write_tokens,
                      "cache_read_input_tokens": usage.cache_read_tokens,
                      "cache_creation": {"ephemeral_5m_input_tokens": usage.cache_write_tokens,
                                         "ephemeral_1h_input_tokens": 0}},
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
        n, item = self._next(role, body)
        text = item.format(n=n + 1) if role == "executor" else (json.dumps(item) if isinstance(item, dict) else item)
        prompt = _prompt_text(body)
        usage = self._bill("openai", role, body["model"], prompt, text,
                           cache=lambda total: self._openai_cached(body, prompt, total))
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

    def _bill(self, api: str, role: str, model: str, prompt: str, output: str,
              cache: Any = None) -> Billed:
        total_in = len(prompt) // 4 + 10
        if self.script.cached_tokens:  # scripted: that many tokens read from the cache, whatever was sent
            read, written = min(self.script.cached_tokens, total_in), 0
        else:
            read, written = cache(total_in) if cache is not None else (0, 0)
        billed = Billed(api, role, model, total_in - read - written, len(output) // 4 + 5, read, prompt, written)
        self.billed.append(billed)
        return billed

    def _anthropic_cached(self, body: dict[str, Any], total: int) -> tuple[int, int]:
        """(read, written): the prefix up to the last `cache_control` block, if long enough, read when cached."""
        prefix = _anthropic_prefix(body)
        if prefix is None or (tokens := min(len(prefix) // 4, total)) < CACHE_MIN_TOKENS:
            return 0, 0
        key, now = (body["model"], hashlib.sha256(prefix.encode()).hexdigest()), time.monotonic()
        with self._lock:
            hit = self._anthropic_cache.get(key, 0.0) > now
            self._anthropic_cache[key] = now + CACHE_TTL_S  # a hit refreshes the entry's lifetime
        return (tokens, 0) if hit else (0, tokens)

    def _openai_cached(self, body: dict[str, Any], prompt: str, total: int) -> tuple[int, int]:
        """(read, 0): the longest prefix shared with an earlier prompt of the same model and cache key."""
        key = (body["model"], body.get("prompt_cache_key"))
        with self._lock:
            earlier = self._openai_prompts.setdefault(key, [])
            shared = max((_common_prefix(prompt, e) for e in earlier), default=0)
            earlier.append(prompt)
        tokens = min(shared // 4, total) // OPENAI_CACHE_STEP * OPENAI_CACHE_STEP
        return (tokens, 0) if tokens >= CACHE_MIN_TOKENS else (0, 0)


def _prompt_text(body: dict[str, Any]) -> str:
    parts = [json.dumps(body.get("system", ""))]
    parts += [json.dumps(_billable(m.get("content"))) for m in body.get("messages", [])]
    parts.append(json.dumps(body.get("tools") or body.get("response_format") or ""))
    return "".join(parts)


def _anthropic_prefix(body: dict[str, Any]) -> str | None:
    """The cached prefix as Anthropic orders it (tools, system, messages) up to the last `cache_control` block."""
    blocks = [(m["role"], block) for m in body.get("messages", []) if isinstance(m.get("content"), list)
              for block in m["content"]]
    marks = [i for i, (_, block) in enumerate(blocks) if isinstance(block, dict) and block.get("cache_control")]
    if not marks:
        return None
    head = [json.dumps(body.get("tools") or ""), json.dumps(body.get("system", ""))]
    return "".join(head + [json.dumps(_billable([b])) for _, b in blocks[:marks[-1] + 1]])


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


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
