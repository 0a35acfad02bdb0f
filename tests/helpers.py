"""Small helpers shared by the tests: run a job, read its log and its Prefect artifacts."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flows.job import factory

NOT_YET = {"converged": False, "confidence": 0.4, "strengths": ["clear"], "weaknesses": ["too short"],
           "feedback_for_executor": "Make it longer."}
DONE = {"converged": True, "confidence": 0.92, "strengths": ["meets the objective"], "weaknesses": [],
        "feedback_for_executor": ""}


def job_params(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "seed": "Write a four-line poem about rivers.",
        "objective": "Four lines, about rivers, with a rhyme.",
        "job_id": f"t-{uuid.uuid4().hex[:12]}",
    }
    params.update(overrides)
    return params


async def run_job(**overrides: Any):
    """Run the flow in-process against the test Prefect server; returns its final State."""
    return await factory(**job_params(**overrides), return_state=True)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())["events"]


def event_names(path: str | Path) -> list[str]:
    return [e["event"] for e in read_log(path)]


async def artifacts_of(flow_run_id) -> dict[str, list]:
    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_key: dict[str, list] = {}
    for artifact in sorted(found, key=lambda a: a.created):
        by_key.setdefault(artifact.key, []).append(artifact)
    return by_key
