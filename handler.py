"""The RunPod serverless entry of this project's image: `CMD python -u handler.py`.

Two payloads:
- from the `runpod` Prefect worker, `{"input": {"command": ..., "env": {...}}}`: runs that flow-run
  command (`prefect flow-run execute`) with that environment and returns `{"exit_code": N}`;
- the original Factory API, `{"input": <JobInput>}`: runs a whole Factory job and returns
  `{"status": "success", "result": <JobResult>}` or `{"status": "error", "error": "..."}`.

Locally: `python handler.py --test_input '{"input": {"seed": "...", "objective": "...",
"executor_model": "dry-run", "evaluator_model": "dry-run"}}'`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import runpod
from pydantic import ValidationError

from factory.errors import FactoryError
from factory.models import JobInput
from factory.settings import get_settings
from flows.job import factory
from flows.loop import progress_listener

logger = logging.getLogger("factory.handler")
PROJECT_DIR = Path(__file__).resolve().parent

# Models load once per RunPod worker, here, outside the handler function: jobs run through the original
# API generate in this process (FACTORY_GPU_LOCAL). Flow runs from the worker run in their own process.
if get_settings().preload_models:
    from factory.media.diffusers import preload_from_env

    preload_from_env()


async def run_command(command: str, env: dict[str, str]) -> dict[str, Any]:
    """Run a flow-run command from the worker in this image's project folder; its exit code is the result."""
    args = shlex.split(command)
    logger.info("Running %s", args[:3])
    process = await asyncio.create_subprocess_exec(*args, env={**os.environ, **env}, cwd=PROJECT_DIR)
    return {"exit_code": await process.wait()}


async def run_job(job_request: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Validate the whole JobInput first (every problem at once), then run the job's flow, reporting
    each finished iteration with `progress_update`."""
    try:
        job = JobInput.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"`{'.'.join(str(p) for p in e['loc'])}`: {e['msg']}" for e in exc.errors())
        return {"status": "error", "error": f"invalid input: {problems}"}
    token = progress_listener.set(lambda progress: runpod.serverless.progress_update(job_request, progress))
    try:
        result = await factory(**job.model_dump(exclude_none=True))
    except FactoryError as exc:
        return {"status": "error", "error": str(exc)}
    finally:
        progress_listener.reset(token)
    return {"status": "success", "result": result.model_dump(mode="json")}


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    payload = job.get("input")
    if not isinstance(payload, dict):
        return {"status": "error", "error": "`input` must be an object"}
    if "command" in payload:
        env = payload.get("env") or {}
        if not isinstance(payload["command"], str) or not isinstance(env, dict):
            return {"status": "error", "error": "`input.command` must be a string and `input.env` an object"}
        return await run_command(payload["command"], {str(k): str(v) for k, v in env.items()})
    return await run_job(job, payload)


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
