"""Media calls that bill and then break, and media that does not decode: counted, kept, retried, never cached."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from factory.models import JobResult, JobStatus, StopReason, Usage
from factory.pricing import price_for
from factory.settings import get_settings
from factory.storage import get_storage
from tests.conftest import billed_cost
from tests.emulators.llm import Script
from tests.emulators.media import MediaScript
from tests.helpers import DONE, read_log, run_job
from tests.test_media_jobs import media_cost, media_env  # noqa: F401 - the fixture

FLUX = "fal:fal-ai/flux/schnell"
VOICE = "elevenlabs:eleven_multilingual_v2"


def failed_result(job_id: str) -> JobResult:
    return JobResult.model_validate_json((get_storage().root / job_id / "result.json").read_bytes())


async def test_an_image_whose_download_failed_after_it_was_billed_is_counted(media_env):  # noqa: F811
    llm, fal = media_env
    llm.reset(Script(verdicts=[DONE]))
    # The image is made (and billed), then its file cannot be fetched five times in a row; the retry pays again.
    fal.reset(MediaScript(faults=[None, "500", "500", "500", "500", "500"]))
    result = await (await run_job(function="IMAGE_GENERATION", seed="A red circle.", executor_model=FLUX)).aresult()
    assert result.status is JobStatus.CONVERGED
    assert len(fal.billed) == 2
    assert Decimal(str(result.total_cost_usd)) == media_cost(fal.billed) + billed_cost(llm)
    executor = [e["data"] for e in read_log(result.log_ref) if e["event"] == "ITERATION_END"][0]["calls"][0]
    assert "could not be fetched" in executor["failed"]


async def test_speech_with_an_unreadable_character_cost_is_charged_its_bound(media_env):  # noqa: F811
    llm, eleven = media_env
    llm.reset(Script(verdicts=[DONE]))
    eleven.reset(MediaScript(bad_character_costs=1))
    seed = "Say: the river keeps its own time."
    result = await (await run_job(function="AUDIO_GENERATION", seed=seed, executor_model=VOICE)).aresult()
    assert result.status is JobStatus.CONVERGED and len(eleven.billed) == 2
    price = price_for(VOICE, get_settings())
    bound = price.cost(Usage(characters=len(seed)))
    known = media_cost(eleven.billed[1:])
    assert Decimal(str(result.total_cost_usd)) == bound + known + media_cost(llm.media_billed) + billed_cost(llm)
    assert result.iterations_detail[0].usage_known is False


async def test_media_that_does_not_decode_is_kept_charged_and_made_again(media_env):  # noqa: F811
    llm, fal = media_env
    llm.reset(Script(verdicts=[DONE]))
    fal.reset(MediaScript(corrupt_renders=1))
    result = await (await run_job(function="IMAGE_GENERATION", seed="A red circle.", executor_model=FLUX)).aresult()
    assert result.status is JobStatus.CONVERGED and len(fal.billed) == 2
    assert Decimal(str(result.total_cost_usd)) == media_cost(fal.billed) + billed_cost(llm)
    kept = Path(result.final_artifact_ref).parent / "iteration-01-rejected-1.png"
    assert kept.exists() and kept.read_bytes() != Path(result.final_artifact_ref).read_bytes()
    assert len(llm.requests) == 1, "the evaluator saw only the image that decodes"


async def test_media_that_never_decodes_fails_the_job_readably_and_is_not_cached(media_env):  # noqa: F811
    llm, fal = media_env
    llm.reset(Script(verdicts=[DONE]))
    fal.reset(MediaScript(corrupt_renders=100))
    state = await run_job(function="IMAGE_GENERATION", job_id="media-undecodable", executor_model=FLUX)
    assert state.is_failed() and "could not be decoded" in state.message
    failed = failed_result("media-undecodable")
    assert failed.stop_reason is StopReason.ERROR and failed.total_iterations == 0
    attempts = get_settings().retries + 1
    assert len(fal.billed) == attempts and Decimal(str(failed.total_cost_usd)) == media_cost(fal.billed)
    assert failed.other_cost_usd == failed.total_cost_usd
    fal.reset(MediaScript())
    again = await (await run_job(function="IMAGE_GENERATION", job_id="media-undecodable",
                                 executor_model=FLUX)).aresult()
    assert again.status is JobStatus.CONVERGED and len(fal.billed) == 1, "the re-run made the image again"
