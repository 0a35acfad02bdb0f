"""Bad input is refused with the field named, before any money is spent."""

from __future__ import annotations

from datetime import date

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError

import blocks.credentials as credentials
from factory.errors import ConfigurationError
from factory.preflight import plan_model
from factory.settings import get_settings
from flows.job import factory
from tests.conftest import reset_settings
from tests.helpers import job_params, run_job


@pytest.fixture(scope="module")
async def deployment(prefect_server):
    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name="factory-local", type="process"))
        except ObjectAlreadyExists:
            pass
    await (await factory.to_deployment(name="job", work_pool_name="factory-local")).apply()
    return "factory/job"


BAD_PARAMS = [
    ({"seed": ""}, "seed"),
    ({"seed": "x" * 50_001}, "seed"),
    ({"objective": ""}, "objective"),
    ({"objective": "x" * 5_001}, "objective"),
    ({"function": "PAINTING"}, "function"),
    ({"limits": {"max_cycles": 0}}, "limits.max_cycles"),
    ({"limits": {"max_cycles": 51}}, "limits.max_cycles"),
    ({"limits": {"budget_usd": 0.01}}, "limits.budget_usd"),
    ({"limits": {"budget_usd": 1000}}, "limits.budget_usd"),
    ({"limits": {"timeout_minutes": 481}}, "limits.timeout_minutes"),
    ({"limits": {"min_confidence": 0.3}}, "limits.min_confidence"),
    ({"limits": {"min_confidence": 1.5}}, "limits.min_confidence"),
    ({"limits": {"max_cycles": "many"}}, "limits.max_cycles"),
    ({"limits": {"retries": 3}}, "limits"),
    ({"job_id": "../../etc"}, "job_id"),
    ({"input_refs": "notes.txt"}, "input_refs"),
    ({"executor_model": ""}, "executor_model"),
]


@pytest.mark.parametrize("overrides, field", BAD_PARAMS, ids=[f for _, f in BAD_PARAMS])
async def test_deployment_refuses_bad_parameters_at_creation(deployment, overrides, field):
    with pytest.raises(PrefectHTTPStatusError) as caught:
        await run_deployment(deployment, parameters=job_params(**overrides), timeout=0)
    assert caught.value.response.status_code == 409
    assert f"field '{field}'" in caught.value.response.json()["detail"]


async def test_deployment_refuses_missing_seed(deployment):
    params = job_params()
    del params["seed"]
    with pytest.raises(PrefectHTTPStatusError, match="'seed' is a required property"):
        await run_deployment(deployment, parameters=params, timeout=0)


PREFLIGHT = [
    ({"output_ref": "/etc/factory-out"}, "output_ref", "outside the storage root"),
    ({"log_ref": "../../escape/log.json"}, "log_ref", "outside the storage root"),
    ({"output_ref": "gs://bucket/out/"}, "output_ref", "'gs://' scheme"),
    ({"output_ref": "s3:///out/"}, "output_ref", "names no bucket"),
    ({"executor_model": "claude-unpriced-9"}, "executor_model", "no price is known"),
    ({"evaluator_model": "mystery-model"}, "evaluator_model", "cannot tell which provider"),
    ({"executor_model": "claude-mythos-preview"}, "executor_model", "retired on 2026-06-30"),
    ({"function": "IMAGE_GENERATION", "executor_model": "claude-sonnet-5-5"}, "executor_model", "makes no image"),
    ({"function": "IMAGE_GENERATION"}, "executor_model", "or use a `diffusers:` model on the GPU pool"),
    ({"function": "VIDEO_GENERATION", "input_refs": ["notes.txt"]}, "input_refs", "text prompt only"),
    ({"function": "AUDIO_GENERATION", "executor_model": "elevenlabs:eleven_v9"}, "executor_model",
     "no price is known"),
    ({"input_refs": ["missing/notes.txt"]}, "input_refs[0]", "cannot be read"),
    # Roles: a media model cannot judge or write text, a chat model makes no media.
    ({"evaluator_model": "gpt-image-1"}, "evaluator_model", "is an image generation model, not a chat model"),
    ({"evaluator_model": "tts-1-hd"}, "evaluator_model", "is a speech model"),
    ({"evaluator_model": "whisper-1"}, "evaluator_model", "is a transcription model"),
    ({"evaluator_model": "gpt-4o-mini-transcribe"}, "evaluator_model", "is a transcription model"),
    ({"evaluator_model": "fal:fal-ai/flux/schnell"}, "evaluator_model", "is a media generation model"),
    ({"function": "IMAGE_GENERATION", "evaluator_model": "dall-e-3"}, "evaluator_model", "image generation model"),
    ({"executor_model": "gpt-image-1"}, "executor_model", "is an image generation model"),
    ({"function": "AUDIO_GENERATION", "executor_model": "gpt-5.4"}, "executor_model", "makes no audio"),
]


@pytest.mark.parametrize("overrides, field, message", PREFLIGHT,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(PREFLIGHT)])
async def test_preflight_refuses_before_any_call(factory_env, overrides, field, message):
    llm = factory_env
    state = await run_job(**overrides)
    assert state.is_failed()
    assert f"`{field}`" in state.message and message in state.message
    assert llm.requests == [], "nothing may be spent on a refused job"


async def test_configured_price_admits_an_unpriced_model(factory_env, monkeypatch):
    monkeypatch.setenv("FACTORY_PRICES", '{"openai:local-llama": {"input": 0.5, "output": 1.5}}')
    reset_settings()
    state = await run_job(executor_model="openai:local-llama", evaluator_model="dry-run")
    assert state.is_completed()
    assert factory_env.requests[0]["body"]["model"] == "local-llama"
    assert "max_tokens" in factory_env.requests[0]["body"]


async def test_missing_api_key_is_refused_naming_the_variable(factory_env, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    async with get_client() as client:  # a block saved by an earlier test (blocks.register) would win
        try:
            await client.delete_block_document(
                (await client.read_block_document_by_name("anthropic-api-key", "secret")).id)
        except ObjectNotFound:
            pass
    monkeypatch.setattr(credentials, "_cache", {})
    state = await run_job()
    assert state.is_failed()
    assert "`executor_model`" in state.message and "ANTHROPIC_API_KEY" in state.message
    assert factory_env.requests == []


async def test_an_audio_job_without_a_transcription_key_is_refused_before_any_call(factory_env, media_api,
                                                                                 monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setattr(credentials, "_cache", {})
    state = await run_job(function="AUDIO_GENERATION", executor_model="elevenlabs:eleven_multilingual_v2")
    assert state.is_failed()
    assert "`function`" in state.message and "OPENAI_API_KEY" in state.message
    assert factory_env.requests == [] and media_api.requests == []


def test_model_close_to_retirement_warns():
    warnings: list[str] = []
    plan_model("claude-sonnet-4-5", "executor_model", get_settings(), date(2026, 11, 20), warnings)
    assert warnings and "retires on 2026-11-30" in warnings[0]
    with pytest.raises(ConfigurationError, match="retired on 2026-11-30"):
        plan_model("claude-sonnet-4-5", "executor_model", get_settings(), date(2026, 12, 1), [])


async def test_secret_block_wins_over_the_environment(factory_env, monkeypatch):
    from blocks.register import register
    monkeypatch.delenv("FACTORY_S3_BUCKET", raising=False)  # Secret blocks only: other tests own the S3 ones
    saved = await register()
    assert "anthropic-api-key" in saved
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong-key-from-env")
    monkeypatch.setattr(credentials, "_cache", {})
    try:
        state = await run_job()
    finally:
        async with get_client() as client:
            for name in saved:
                block = await client.read_block_document_by_name(name, block_type_slug="secret")
                await client.delete_block_document(block.id)
    assert state.is_completed(), state.message


async def test_text_input_refs_are_capped_in_total(factory_env, storage_root):
    for name in ("a.txt", "b.txt"):
        (storage_root / "inputs").mkdir(parents=True, exist_ok=True)
        (storage_root / "inputs" / name).write_text("x" * 250_000)
    state = await run_job(input_refs=["inputs/a.txt", "inputs/b.txt"])
    assert state.is_failed() and "`input_refs[1]`" in state.message and "in all" in state.message
    assert factory_env.requests == []
