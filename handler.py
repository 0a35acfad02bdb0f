"""The RunPod serverless entry of this project's image: `CMD python -u handler.py`.

Two payloads:
- from the `runpod` Prefect worker, `{"input": {"command": ..., "env": {...}}}`: runs that flow-run
  command with that environment and returns `{"exit_code": N}`. Only the commands the worker sends
  are run (see `worker_command`), and no variable that changes how a program starts is taken
  (see `REFUSED_ENV`): anything else is refused, naming the field, and nothing runs;
- the original Factory API, `{"input": <JobInput>}`: runs a whole Factory job and returns
  `{"status": "success", "result": <JobResult>}` or `{"status": "error", "error": "..."}`.

Locally: `python handler.py --test_input '{"input": {"seed": "...", "objective": "...",
"executor_model": "dry-run", "evaluator_model": "dry-run"}}'`.
"""

from __future__ import annotations

import os

# Without a Prefect API (the original API on a RunPod worker, or a local `--test_input`), Prefect starts a
# temporary server. On a cold worker it first migrates a fresh SQLite database, which can take longer than
# Prefect's 20 s default; its telemetry heartbeat races that migration ("database is locked") and cannot
# reach the internet from a worker anyway: ERROR tracebacks in a job that succeeded. Set before Prefect is
# imported (it reads its settings then); an explicit setting still wins.
if not os.environ.get("PREFECT_API_URL"):
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import asyncio
import logging
import re
import shlex
import sys
from collections.abc import Callable
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
LOG_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"
PROJECT_DIR = Path(__file__).resolve().parent

# What the `runpod` worker sends (workers/runpod.py sends the flow run's `command`): Prefect's flow-run command
# for deployment runs, or, for flows bound with `@runpod`, the pool's S3 bundle step run by the image's Python
# (`prefect work-pool storage configure s3 ... --launcher python`, as scripts/gpu-pool.sh does).
FLOW_RUN_COMMAND = ["prefect", "flow-run", "execute"]
BUNDLE_MODULES = {"prefect_aws.experimental.bundles.execute", "prefect_aws.bundles.execute"}
BUNDLE_OPTIONS = {"--bucket": True, "--key": True, "--aws-credentials-block-name": False}  # name: required
PYTHON_LAUNCHER = re.compile(r"python(3(\.\d+)?)?")
# Variables that choose which program starts or what it loads before its own code: PATH, the dynamic
# loader's (LD_*, DYLD_*, and glibc's GCONV_PATH and GLIBC_TUNABLES, which load code too), Python's
# (PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, ...) and the shells' start-up files (BASH_ENV, ENV).
REFUSED_ENV = re.compile(r"PATH|LD_.*|DYLD_.*|GCONV_PATH|GLIBC_TUNABLES|PYTHON.*|BASH_ENV|ENV", re.IGNORECASE)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Models load once per RunPod worker, here, outside the handler function: jobs run through the original
# API generate in this process (FACTORY_GPU_LOCAL). Flow runs from the worker run in their own process.
if get_settings().preload_models:
    from factory.media.diffusers import preload_from_env

    preload_from_env()


def worker_command(command: str) -> tuple[list[str] | None, str | None]:
    """The argv of `command` if it is one the `runpod` worker sends, else why not.

    Example:
        >>> worker_command("prefect flow-run execute")
        (['prefect', 'flow-run', 'execute'], None)
        >>> worker_command("sh -c id")[1].startswith("`sh -c id` is not a command the `runpod` worker sends")
        True
    """
    try:
        args = shlex.split(command)
    except ValueError as exc:
        return None, f"cannot be split into arguments ({exc})"
    if not args:
        return None, "is empty"
    if args == FLOW_RUN_COMMAND:
        return args, None
    if len(args) >= 3 and _is_python(args[0]) and args[1] == "-m" and args[2] in BUNDLE_MODULES:
        problem = _bundle_options_problem(args[3:])
        return (None, f"`{args[2]}` {problem}") if problem else (args, None)
    shown = command.strip() if len(command.strip()) <= 80 else command.strip()[:80] + "..."
    return None, (f"`{shown}` is not a command the `runpod` worker sends; it sends "
                  f"`{shlex.join(FLOW_RUN_COMMAND)}` (deployment runs) or `python -m "
                  f"{min(BUNDLE_MODULES)} --bucket B --key K` (bundles of a pool whose storage is S3 with "
                  "`--launcher python`)")


def _is_python(program: str) -> bool:
    """The image's Python: by name (found on the image's PATH, which the job cannot change) or this one."""
    return PYTHON_LAUNCHER.fullmatch(program) is not None or program == sys.executable


def _bundle_options_problem(options: list[str]) -> str | None:
    pairs = dict(zip(options[::2], options[1::2], strict=False))  # an odd one out is refused below
    if len(options) % 2 or len(pairs) * 2 != len(options):
        return "takes each option once, with one value"
    if unknown := sorted(set(pairs) - set(BUNDLE_OPTIONS)):
        return f"takes no {', '.join(unknown)}; only {', '.join(BUNDLE_OPTIONS)}"
    if missing := [name for name, required in BUNDLE_OPTIONS.items() if required and name not in pairs]:
        return f"needs {', '.join(missing)}"
    if bad := [name for name, value in pairs.items() if not value or value.startswith("-")]:
        return f"needs a value for {', '.join(bad)}"
    return None


def env_problems(env: dict[str, Any]) -> list[str]:
    """Why each refused variable of `input.env` is refused, naming its field."""
    problems = []
    for name, value in env.items():
        if not ENV_NAME.fullmatch(str(name)):
            problems.append(f"`input.env.{name}`: not a variable name")
        elif REFUSED_ENV.fullmatch(name):
            problems.append(f"`input.env.{name}`: refused, it changes which program starts or what it loads; "
                            "set it in the image (Dockerfile) instead")
        elif "\0" in str(value):
            problems.append(f"`input.env.{name}`: holds a NUL character")
    return problems


async def run_command(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a checked flow-run command from the worker in this image's project folder; its exit code is the result."""
    logger.info("Running %s", args[:3])
    process = await asyncio.create_subprocess_exec(*args, env={**os.environ, **env}, cwd=PROJECT_DIR)
    return {"exit_code": await process.wait()}


async def run_worker_request(payload: dict[str, Any]) -> dict[str, Any]:
    """Check the worker's `command` and `env` (every problem at once), then run the command."""
    command, env = payload["command"], payload.get("env") or {}
    if not isinstance(command, str) or not isinstance(env, dict):
        return {"status": "error", "error": "`input.command` must be a string and `input.env` an object"}
    args, problem = worker_command(command)
    problems = ([f"`input.command`: {problem}"] if problem else []) + env_problems(env)
    if problems or args is None:
        logger.warning("Refused a worker request: %s", "; ".join(problems))
        return {"status": "error", "error": "refused, nothing was run: " + "; ".join(problems)}
    return await run_command(args, {str(k): str(v) for k, v in env.items()})


def progress_reporter(job_request: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """Where each finished iteration is reported: RunPod's progress webhook on a RunPod worker; the log when
    run locally (`--test_input`, `--rp_serve_api`), where `progress_update` has no webhook and logs an ERROR."""
    if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return lambda progress: runpod.serverless.progress_update(job_request, progress)
    return lambda progress: logger.info("Job %s: %s", job_request.get("id"), progress)


async def run_job(job_request: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """Validate the whole JobInput first (every problem at once), then run the job's flow, reporting
    each finished iteration with `progress_update`."""
    try:
        job = JobInput.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"`{'.'.join(str(p) for p in e['loc'])}`: {e['msg']}" for e in exc.errors())
        return {"status": "error", "error": f"invalid input: {problems}"}
    token = progress_listener.set(progress_reporter(job_request))
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
        return await run_worker_request(payload)
    return await run_job(job, payload)


if __name__ == "__main__":
    # Importing runpod calls logging.basicConfig with a format that drops the level, and Prefect keeps the
    # root handler it finds: put the level back on every line, so a warning or an error reads as one.
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
    runpod.serverless.start({"handler": handler})
