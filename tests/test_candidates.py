"""Best-of-K candidates through a real Prefect server and the emulator: distinct calls at once, the budget held for
all of them first, every candidate stored and priced, the best carried forward."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError

from factory.models import JobResult, StopReason
from tests.conftest import billed_cost
from tests.emulators.llm import Script
from tests.helpers import DONE, NOT_YET, job_params, read_log, run_job
from tests.test_params import deployment  # noqa: F401 - the fixture

CONFIDENCE = {1: 0.5, 2: 0.7, 3: 0.4}  # iteration 1's drafts; iteration 2 converges on draft 5 only


def judge(prompt: str) -> dict:
    """A verdict that depends on which draft is being judged (the calls run at once, in no fixed order)."""
    artifact = prompt.split("Artifact to judge:", 1)[1]
    draft = int(re.search(r"Draft (\d+)", artifact).group(1))
    if draft == 5:
        return DONE
    return {**NOT_YET, "confidence": CONFIDENCE.get(draft, 0.3), "feedback_for_executor": f"About draft {draft}."}


def executor_prompts(llm) -> list[str]:
    bodies = [r["body"] for r in llm.requests if not r["body"].get("tools")]
    return [m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"])
            for m in (b["messages"][0] for b in bodies)]


async def test_three_candidates_carry_the_best_forward_and_are_all_stored_and_priced(factory_env):
    llm = factory_env
    llm.reset(Script(judge=judge))
    result: JobResult = await (await run_job(candidates=3, limits={"max_cycles": 4})).result()
    assert result.stop_reason is StopReason.CONFORMITY and result.total_iterations == 2
    first = result.iterations_detail[0]
    assert len(first.candidates) == 3 and sorted(c.candidate for c in first.candidates) == [1, 2, 3]
    kept = next(c for c in first.candidates if c.chosen)
    assert first.artifact_ref == kept.artifact_ref and Path(kept.artifact_ref).read_text() == "Draft 2: an artifact."
    assert first.confidence == 0.7
    assert all(Path(c.artifact_ref).name == f"iteration-01-c{c.candidate}.md" for c in first.candidates)
    assert all(Path(c.artifact_ref).exists() for d in result.iterations_detail for c in d.candidates)
    for detail in result.iterations_detail:
        assert sum(Decimal(str(c.cost_usd)) for c in detail.candidates) == pytest.approx(Decimal(str(detail.cost_usd)))
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm)
    prompts = executor_prompts(llm)
    assert len(prompts) == 6 and len(set(prompts[:3])) == 3, "each candidate is a distinct request"
    assert all("Draft 2: an artifact." in p and "About draft 2." in p for p in prompts[3:])
    assert result.final_artifact_ref.endswith(".md") and Path(result.final_artifact_ref).read_text() == \
        "Draft 5: an artifact."
    events = read_log(result.log_ref)
    assert sorted(e["data"]["candidate"] for e in events if e["event"] == "EVALUATOR_RESPONSE"
                  and e["data"].get("candidate") and events.index(e) < 20)[:3] == [1, 2, 3]


async def test_candidates_whose_worst_case_cannot_all_fit_are_never_started(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET]))
    result: JobResult = await (await run_job(candidates=3, limits={"budget_usd": 0.45})).result()
    assert result.stop_reason is StopReason.BUDGET and "3 candidates of iteration 1" in result.error
    assert llm.requests == [] and result.total_cost_usd == 0


async def test_candidates_never_cross_the_budget(factory_env):
    llm = factory_env
    llm.reset(Script(verdicts=[NOT_YET]))
    refused: JobResult = await (await run_job(candidates=2, limits={"budget_usd": 0.1})).result()
    hold = Decimal(re.search(r"could cost up to \$([0-9.]+)", refused.error).group(1))
    budget = float(round(hold + Decimal("0.02"), 2))  # room for the hold and a few iterations' real spend
    llm.reset(Script(verdicts=[NOT_YET], latency_s=0.05))
    result: JobResult = await (await run_job(candidates=2, limits={"budget_usd": budget, "max_cycles": 50})).result()
    assert result.stop_reason is StopReason.BUDGET and result.total_iterations >= 2
    assert Decimal(str(result.total_cost_usd)) == billed_cost(llm) <= Decimal(str(budget))


async def test_candidates_are_for_text_jobs(factory_env):
    state = await run_job(function="IMAGE_GENERATION", executor_model="fal:fal-ai/flux/schnell", candidates=2)
    assert state.is_failed() and "`candidates`" in state.message and factory_env.requests == []


async def test_the_deployment_refuses_more_than_eight_candidates(deployment):  # noqa: F811
    with pytest.raises(PrefectHTTPStatusError) as caught:
        await run_deployment(deployment, parameters=job_params(candidates=9), timeout=0)
    assert "'candidates'" in caught.value.response.json()["detail"]
