"""Start one Factory job through the Prefect REST API with httpx, and print its JobResult.

    python examples/api/start_job.py ['{"seed": "...", "objective": "...", "limits": {"budget_usd": 2}}']

The same calls as start_job.sh: the deployment by name, `create_flow_run` with the parameters, the flow run polled
until its state type is final, then the JobResult from the run's `factory-<job>-summary` artifact (a fenced json
block under "## JobResult"). Environment: PREFECT_API_URL (the quickstart's server by default), PREFECT_API_KEY or
PREFECT_API_AUTH_STRING when the server wants them, DEPLOYMENT, TIMEOUT_S (3600), POLL_S (2).
Exits 0 only when the flow run COMPLETED, 2 when it is still going after TIMEOUT_S.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from typing import Any

import httpx

DEFAULT_PARAMS: dict[str, Any] = {"seed": "Write a haiku about rivers.",
                                  "objective": "A haiku (5-7-5 syllables) about rivers."}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
JOB_RESULT = re.compile(r"## JobResult\n(`{3,})json\n(.*?)\n\1", re.S)
RETRIES = 5
RETRY_CODES = {408, 429, 502, 503}
TRANSIENT = (httpx.TimeoutException, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


def prefect_client() -> httpx.Client:
    api = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api").rstrip("/")
    headers: dict[str, str] = {}
    auth: tuple[str, str] | None = None
    if key := os.environ.get("PREFECT_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    elif basic := os.environ.get("PREFECT_API_AUTH_STRING"):
        user, _, password = basic.partition(":")
        auth = (user, password)
    return httpx.Client(base_url=api + "/", headers=headers, auth=auth, timeout=30)


def call(client: httpx.Client, method: str, path: str, body: Any = None) -> Any:
    """The answer's JSON. Retried as Prefect's own client does: timeouts, dropped connections, 408, 429, 502 and
    503 (a busy SQLite server), waiting `retry-after` or 1, 2, 4, 8, 16 s; another error answer ends the script."""
    for attempt in range(RETRIES + 1):
        wait = 2.0**attempt
        try:
            response = client.request(method, path, json=body)
        except TRANSIENT as error:
            if attempt == RETRIES:
                raise SystemExit(f"start_job: {method} {path} failed: {error!r}") from error
        else:
            if response.status_code not in RETRY_CODES or attempt == RETRIES:
                break
            wait = float(after) if (after := response.headers.get("retry-after", "")).isdigit() else wait
        time.sleep(wait)
    if response.is_error:
        raise SystemExit(f"start_job: {method} {response.url} failed: {response.status_code} {response.text}")
    return response.json()


def start(client: httpx.Client, deployment: str, params: dict[str, Any]) -> str:
    deployment_id = call(client, "GET", f"deployments/name/{deployment}")["id"]
    # The idempotency key makes a retried create_flow_run return the run the first attempt created.
    body = {"parameters": params, "idempotency_key": f"start_job-{uuid.uuid4()}"}
    return str(call(client, "POST", f"deployments/{deployment_id}/create_flow_run", body)["id"])


def wait_final(client: httpx.Client, flow_run_id: str, timeout_s: float, poll_s: float) -> dict[str, Any] | None:
    """The run's final state (`type`, `message`, ...), or None when it is not final after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        state: dict[str, Any] = call(client, "GET", f"flow_runs/{flow_run_id}")["state"]
        if state["type"] != last:
            print(f"start_job: {state['type']}", file=sys.stderr)
            last = state["type"]
        if state["type"] in FINAL:
            return state
        if time.monotonic() >= deadline:
            print(f"start_job: flow run {flow_run_id} is still {last} after {timeout_s:g}s", file=sys.stderr)
            return None
        time.sleep(poll_s)


def job_result(client: httpx.Client, flow_run_id: str) -> dict[str, Any] | None:
    """The JobResult in the run's summary artifact; `like_` matches '%<value>%', so the key's end is checked here."""
    artifacts = call(client, "POST", "artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"like_": "%-summary"}},
        "sort": "CREATED_DESC", "limit": 20})
    for artifact in artifacts:
        found = JOB_RESULT.search(artifact.get("data") or "")
        if (artifact.get("key") or "").endswith("-summary") and found:
            result: dict[str, Any] = json.loads(found.group(2))
            return result
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    params = json.loads(args[0]) if args else DEFAULT_PARAMS
    if not isinstance(params, dict):
        raise SystemExit("start_job: the parameters must be a JSON object")
    deployment = os.environ.get("DEPLOYMENT", "factory/job")
    with prefect_client() as client:
        flow_run_id = start(client, deployment, params)
        print(f"start_job: flow run {flow_run_id} of {deployment}", file=sys.stderr)
        state = wait_final(client, flow_run_id, float(os.environ.get("TIMEOUT_S", 3600)),
                           float(os.environ.get("POLL_S", 2)))
        if state is None:
            return 2
        result = job_result(client, flow_run_id)
    if result is not None:
        print(json.dumps(result, indent=2))
    if state["type"] != "COMPLETED":
        message = f": {state['message']}" if state.get("message") else ""
        print(f"start_job: flow run {flow_run_id} ended {state['type']}{message}", file=sys.stderr)
        return 1
    if result is None:
        print("start_job: the flow run published no JobResult summary", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
