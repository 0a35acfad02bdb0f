"""IMAGE, AUDIO and VIDEO jobs with API models, in-process against the test Prefect server: fal and OpenAI
emulators make real media, the evaluator (Anthropic emulator) is shown it, and money adds up to the unit."""

from __future__ import annotations

import base64
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from factory.models import Usage
from factory.pricing import price_for
from factory.settings import get_settings
from tests.conftest import billed_cost, reset_settings
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, artifacts_of, read_log, run_job

REVISED = {**NOT_YET, "feedback_for_executor": "A red circle, centred, on plain white, flat colours."}


@pytest.fixture
def media_env(factory_env, media_api, monkeypatch):
    monkeypatch.setenv("FACTORY_MEDIA_WIDTH", "256")
    monkeypatch.setenv("FACTORY_MEDIA_HEIGHT", "256")
    monkeypatch.setenv("FACTORY_VIDEO_FRAMES", "3")
    monkeypatch.setenv("FACTORY_MEDIA_SECONDS", "2")
    reset_settings()
    yield factory_env, media_api


def judged(llm) -> list[dict]:
    return [r["body"] for r in llm.requests if r.get("api") == "anthropic" and r["body"].get("tools")]


def image_blocks(body: dict) -> list[bytes]:
    content = body["messages"][0]["content"]
    return [] if isinstance(content, str) else [
        base64.b64decode(b["source"]["data"]) for b in content if b["type"] == "image"]


def media_cost(billed) -> Decimal:
    return sum((price_for(b.model, get_settings()).cost(Usage(**b.usage)) for b in billed), Decimal(0))


async def test_image_job_shows_the_evaluator_each_image_and_feeds_back_a_revised_prompt(media_env):
    llm, fal = media_env
    llm.reset(Script(verdicts=[REVISED, DONE]))
    state = await run_job(function="IMAGE_GENERATION", seed="A red circle.", executor_model="fal:fal-ai/flux/schnell")
    result = await state.aresult()
    assert result.status.value == "CONVERGED" and result.total_iterations == 2

    prompts = [r["body"]["prompt"] for r in fal.requests if r["api"] == "fal"]
    assert prompts == ["A red circle.", REVISED["feedback_for_executor"]]
    stored = [Path(d.artifact_ref).read_bytes() for d in result.iterations_detail]
    assert all(Image.open(io.BytesIO(b)).size == (256, 256) for b in stored)
    assert [image_blocks(body) for body in judged(llm)] == [[stored[0]], [stored[1]]]
    assert "size: 256x256 px" in json.dumps(judged(llm)[0])
    assert Decimal(str(result.total_cost_usd)) == media_cost(fal.billed) + billed_cost(llm)
    assert media_cost(fal.billed) == 2 * Decimal("0.003")  # 256x256 rounds up to one megapixel


async def test_audio_job_is_judged_from_its_transcript_and_measured_facts(media_env):
    llm, _ = media_env
    llm.reset(Script(verdicts=[DONE], transcript="Welcome to the river of words."))
    state = await run_job(function="AUDIO_GENERATION", seed="Say: welcome to the river of words.",
                          executor_model="tts-1")
    result = await state.aresult()
    assert result.status.value == "CONVERGED"
    [body] = judged(llm)
    shown = json.dumps(body)
    assert "Welcome to the river of words." in shown and "duration:" in shown and "dBFS" in shown
    assert image_blocks(body) == []
    assert {b.model for b in llm.media_billed} == {"tts-1", "whisper-1"}
    assert Decimal(str(result.total_cost_usd)) == media_cost(llm.media_billed) + billed_cost(llm)
    assert Path(result.final_artifact_ref).suffix == ".mp3"


async def test_video_job_shows_sampled_frames_and_bills_seconds(media_env):
    llm, fal = media_env
    llm.reset(Script(verdicts=[DONE]))
    state = await run_job(function="VIDEO_GENERATION", seed="Waves at dusk.")
    result = await state.aresult()
    assert result.status.value == "CONVERGED"
    [body] = judged(llm)
    frames = image_blocks(body)
    assert len(frames) == 3 and len(set(frames)) == 3  # evenly sampled, not the same frame thrice
    assert "3 frames sampled evenly" in json.dumps(body)
    assert media_cost(fal.billed) == 2 * Decimal("0.157")
    assert Decimal(str(result.total_cost_usd)) == media_cost(fal.billed) + billed_cost(llm)


async def test_rerunning_a_media_job_calls_no_provider(media_env):
    llm, fal = media_env
    llm.reset(Script(verdicts=[DONE]))
    first = await (await run_job(function="IMAGE_GENERATION", job_id="media-rerun")).aresult()
    calls = len(fal.requests), len(llm.requests)
    again = await (await run_job(function="IMAGE_GENERATION", job_id="media-rerun")).aresult()
    assert (len(fal.requests), len(llm.requests)) == calls
    assert again.total_cost_usd == first.total_cost_usd


async def test_a_rate_limited_image_call_is_retried_and_billed_once(media_env):
    llm, fal = media_env
    fal.script.faults = ["429", "500"]
    state = await run_job(function="IMAGE_GENERATION", seed="A red circle.")
    result = await state.aresult()
    assert result.status.value == "CONVERGED"
    assert len(fal.billed) == 1 and media_cost(fal.billed) == Decimal("0.003")
    events = [e["event"] for e in read_log(result.log_ref)]
    assert events.count("EXECUTOR_CALL") == 1


async def test_each_image_iteration_shows_a_thumbnail_in_the_ui(media_env):
    llm, _ = media_env
    llm.reset(Script(verdicts=[DONE]))
    state = await run_job(function="IMAGE_GENERATION", job_id="media-ui")
    found = await artifacts_of(state.state_details.flow_run_id)
    [picture] = found["factory-media-ui-iteration-1-image"]
    assert picture.type == "image" and picture.data.startswith("data:image/jpeg;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(picture.data.split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) <= 320
    assert "Prompt it was generated from" in found["factory-media-ui-iteration-1"][-1].data
