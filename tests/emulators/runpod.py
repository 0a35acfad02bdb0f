"""A loopback emulator of RunPod's serverless API that runs this project's `handler.py`.

`POST /v2/{endpoint}/run`, `GET /v2/{endpoint}/status/{id}`, `POST /v2/{endpoint}/cancel/{id}`,
`GET /v2/{endpoint}/health`. Each job runs the handler in its own process, as a RunPod worker
would (IN_QUEUE -> IN_PROGRESS -> COMPLETED or FAILED); `force` makes the next job end FAILED or
TIMED_OUT instead, `output` makes it end COMPLETED with that output without running the handler, `hold`
keeps it queued; cancel kills the job's process. `status_faults` scripts the next job's first `/status`
answers, one fault per poll: an HTTP status code ("502", "429", "404"), "hang" (no answer for `hang_s`,
past the worker's request timeout), "not-json" (a 200 whose body is not JSON) or "no-status" (JSON
without a job status).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

RUNPOD_KEY = "rpa_test_emulator_key"
REPO = Path(__file__).resolve().parents[2]
HANG_S = 5.0  # longer than any request timeout a test gives the worker
RUN_HANDLER = ("import asyncio, json, sys\nfrom handler import handler\n"
               "print('RESULT ' + json.dumps(asyncio.run(handler(json.loads(sys.argv[1])))))")


@dataclass
class Job:
    id: str
    payload: dict[str, Any]
    status: str = "IN_QUEUE"
    output: Any = None
    error: str | None = None
    faults: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = field(default=None, repr=False)


def runpod_pool_options(api_url: str, endpoint_id: str = "factory-gpu-test"):
    """`prefect work-pool create` options for a `runpod` pool pointed at this emulator (for served_deployment)."""

    def options(env: dict[str, str], work: Path) -> list[str]:
        from tests.processes import run_cli

        listed = run_cli(["work-pool", "get-default-base-job-template", "--type", "runpod"], env)
        template = json.loads(listed.stdout)
        template["variables"]["properties"]["endpoint_id"]["default"] = endpoint_id
        template["variables"]["properties"]["api_url"]["default"] = api_url
        template["variables"]["properties"]["poll_interval_s"]["default"] = 0.5
        (work / "template.json").write_text(json.dumps(template))
        return ["--type", "runpod", "--base-job-template", str(work / "template.json")]

    return options


def _worker_env() -> dict[str, str]:
    """A RunPod worker of this project's image has the project's environment first on PATH (see the Dockerfile)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


class RunPodEmulator:
    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.cancelled: list[str] = []
        self.force: str | None = None
        self.output: Any = None  # the next job ends COMPLETED with this output, without running the handler
        self.hold = False  # keep the next job IN_QUEUE, as when no GPU worker is free
        self.status_faults: list[str] = []  # the next job's first /status answers, one per poll
        self.faults_served: list[str] = []
        self.hang_s = HANG_S
        self.app = Starlette(routes=[
            Route("/v2/{endpoint}/run", self.run, methods=["POST"]),
            Route("/v2/{endpoint}/status/{job_id}", self.status, methods=["GET"]),
            Route("/v2/{endpoint}/cancel/{job_id}", self.cancel, methods=["POST"]),
            Route("/v2/{endpoint}/health", self.health, methods=["GET"]),
        ])

    @staticmethod
    def _authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {RUNPOD_KEY}"

    async def run(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        job = Job(id=f"job-{uuid.uuid4().hex[:12]}", payload=await request.json(), faults=self.status_faults)
        self.jobs[job.id] = job
        if not self.hold:
            threading.Thread(target=self._execute, args=(job, self.force, self.output), daemon=True).start()
        self.force, self.output, self.hold, self.status_faults = None, None, False, []
        return JSONResponse({"id": job.id, "status": job.status})

    def _execute(self, job: Job, force: str | None, output: Any) -> None:
        if force:
            job.status, job.error = force, f"emulated {force}"
            return
        if output is not None:
            job.status, job.output = "COMPLETED", output
            return
        job.status = "IN_PROGRESS"
        job.process = subprocess.Popen([sys.executable, "-c", RUN_HANDLER, json.dumps({"id": job.id, **job.payload})],
                                       cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE, text=True,
                                       start_new_session=True)
        out, _ = job.process.communicate()
        if job.status == "CANCELLED":
            return
        result = next((line[7:] for line in reversed(out.splitlines()) if line.startswith("RESULT ")), None)
        if job.process.returncode or result is None:
            job.status, job.error = "FAILED", f"handler exited {job.process.returncode}"
        else:
            job.status, job.output = "COMPLETED", json.loads(result)

    async def status(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job_id"])
        if not self._authorized(request) or job is None:
            return JSONResponse({"error": "not found"}, status_code=401 if job else 404)
        if job.faults:
            return await self._fault(job.faults.pop(0))
        body = {"id": job.id, "status": job.status}
        if job.output is not None:
            body["output"] = job.output
        if job.error:
            body["error"] = job.error
        return JSONResponse(body)

    async def _fault(self, fault: str) -> Response:
        self.faults_served.append(fault)
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
            return JSONResponse({"error": "answered too late"}, status_code=504)
        if fault == "not-json":
            return Response("<html>upstream connect error</html>", media_type="text/html")
        if fault == "no-status":
            return JSONResponse({"delayTime": 12})
        return JSONResponse({"error": f"emulated HTTP {fault}"}, status_code=int(fault))

    async def cancel(self, request: Request) -> JSONResponse:
        job = self.jobs.get(request.path_params["job_id"])
        if not self._authorized(request) or job is None:
            return JSONResponse({"error": "not found"}, status_code=401 if job else 404)
        job.status = "CANCELLED"
        self.cancelled.append(job.id)
        if job.process is not None and job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGTERM)
        return JSONResponse({"id": job.id, "status": job.status})

    async def health(self, request: Request) -> JSONResponse:
        running = sum(j.status == "IN_PROGRESS" for j in self.jobs.values())
        return JSONResponse({"jobs": {"inProgress": running, "inQueue": 0}, "workers": {"idle": 1, "running": running}})

    def stop_all(self) -> None:
        for job in self.jobs.values():
            if job.process is not None and job.process.poll() is None:
                os.killpg(job.process.pid, signal.SIGKILL)
