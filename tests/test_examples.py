"""The triggers in examples/ and prefect.yaml, against one served deployment (`prefect server start`, a process
worker, `prefect deploy --all`) shared by the module: start_job.sh and start_job.py run as written; the n8n
workflow's HTTP calls are replayed as its JSON writes them, a loopback receiver standing in for its Webhook node
(n8n itself is not run); the example schedule is off, and a schedule of the test's own runs the job.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from factory.callback import signature
from factory.models import JobResult
from tests.emulators.llm import Script
from tests.emulators.server import ThreadedServer
from tests.helpers import DONE, NOT_YET
from tests.processes import FINAL_STATES, REPO, served_deployment
from tests.test_callback import SECRET, Receiver, assert_signed, verify_signature

pytestmark = pytest.mark.cli

EXAMPLES = REPO / "examples"
WORKFLOW = json.loads((EXAMPLES / "n8n" / "workflow.json").read_text())
RUN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def served(llm_server, tmp_path_factory):
    """One served deployment for the module (each costs ~30 s); the scheduler looks every second, not every 60."""
    environment = {"FACTORY_CALLBACK_ALLOWED_HOSTS": "127.0.0.1", "FACTORY_CALLBACK_SECRET": SECRET,
                   "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}
    with served_deployment(tmp_path_factory.mktemp("examples"), environment) as deployment:
        yield deployment


def prefect(method: str, url: str, body: Any = None) -> httpx.Response:
    """A request to the served API, retried on 429/502/503 as Prefect's client does (a busy SQLite answers 503)."""
    for attempt in range(5):
        response = httpx.request(method, url, json=body, timeout=10)
        if response.status_code not in (429, 502, 503):
            break
        time.sleep(2**attempt)
    return response


def wait_final(served: dict, flow_run_id: str) -> str:
    """The flow run's final state type, within RUN_TIMEOUT_S; the worker's log if it is not final by then."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    url = f"{served['api_url']}/flow_runs/{flow_run_id}"
    while (state := prefect("GET", url).json()["state"]["type"]) not in FINAL_STATES:
        assert time.monotonic() < deadline, f"{state}: " + served["worker"].log.read_text()[-3000:]
        time.sleep(0.5)
    return state


def stored_result(result: dict[str, Any]) -> dict[str, Any]:
    """The result.json the job wrote beside its log."""
    return json.loads(Path(result["log_ref"]).with_name("result.json").read_text())


def run_example(args: list[str], served: dict) -> subprocess.CompletedProcess:
    environment = {**served["env"], "POLL_S": "0.5", "TIMEOUT_S": str(RUN_TIMEOUT_S)}
    return subprocess.run(args, env=environment, cwd=REPO, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S + 30)


def assert_converged(run: subprocess.CompletedProcess, served: dict) -> dict[str, Any]:
    assert run.returncode == 0, run.stdout + run.stderr + served["worker"].log.read_text()[-3000:]
    assert "COMPLETED" in run.stderr
    result = json.loads(run.stdout)
    JobResult.model_validate(result)
    assert result["status"] == "CONVERGED" and result["total_iterations"] == 2
    stored = stored_result(result)
    assert result["total_cost_usd"] == stored["total_cost_usd"] > 0
    assert result == stored, "the summary artifact carries the JobResult the job wrote"
    return result


# --- examples/api ------------------------------------------------------------------------------------------------


def test_start_job_sh_runs_the_default_job_and_prints_its_result(served, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET, DONE]))
    run = run_example([str(EXAMPLES / "api" / "start_job.sh")], served)
    result = assert_converged(run, served)
    flow_run_id = re.search(r"flow run ([0-9a-f-]{36})", run.stderr).group(1)
    assert result["job_id"] == flow_run_id, "the default haiku job has no job_id: the flow run id is its id"


def test_start_job_py_runs_the_given_job_and_prints_its_result(served, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET, DONE]))
    params = {"seed": "Write a limerick about queues.", "objective": "A limerick about queues.",
              "job_id": "api-py-1", "limits": {"max_cycles": 4, "budget_usd": 1.0}}
    run = run_example([sys.executable, str(EXAMPLES / "api" / "start_job.py"), json.dumps(params)], served)
    result = assert_converged(run, served)
    assert result["job_id"] == "api-py-1"
    assert Path(result["log_ref"]) == served["storage"] / "api-py-1" / "log.json"


def test_start_job_refuses_bad_parameters_naming_the_field(served):
    params = json.dumps({"seed": "s", "objective": "o", "limits": {"budget_usd": 500}})
    for args in ([str(EXAMPLES / "api" / "start_job.sh"), params],
                 [sys.executable, str(EXAMPLES / "api" / "start_job.py"), params]):
        run = run_example(args, served)
        assert run.returncode != 0 and run.stdout == ""
        assert "create_flow_run failed" in run.stderr and "limits.budget_usd" in run.stderr, run.stderr


# --- examples/n8n ------------------------------------------------------------------------------------------------


def node(name: str) -> dict[str, Any]:
    [found] = [n for n in WORKFLOW["nodes"] if n["name"] == name]
    return found


def of_type(kind: str) -> list[dict[str, Any]]:
    return [n for n in WORKFLOW["nodes"] if n["type"] == f"n8n-nodes-base.{kind}"]


def chain(start: str) -> list[dict[str, Any]]:
    """The nodes after `start`, in connection order (each node's first main output)."""
    found, name = [], start
    while outputs := WORKFLOW["connections"].get(name, {}).get("main"):
        [[target]] = outputs
        name = target["node"]
        found.append(node(name))
    return found


EXECUTION_ID = "4711"


def resolve(value: str, outputs: dict[str, dict], current: dict) -> str:
    """An n8n parameter: literal, or `=` and text with `{{ $json.a.b }}`, `{{ $('Node').item.json.a }}` or
    `{{ $execution.id }}` in it."""
    if not value.startswith("="):
        return value

    def evaluate(match: re.Match) -> str:
        expression = match.group(1)
        if expression == "$execution.id":
            return EXECUTION_ID
        if own := re.fullmatch(r"\$json((?:\.\w+)+)", expression):
            data, path = current, own.group(1)
        elif other := re.fullmatch(r"\$\('([^']+)'\)\.item\.json((?:\.\w+)+)", expression):
            data, path = outputs[other.group(1)], other.group(2)
        else:
            raise AssertionError(f"an expression this replay does not evaluate: {expression}")
        for key in path.lstrip(".").split("."):
            data = data[key]
        return str(data)

    return re.sub(r"\{\{\s*(.*?)\s*\}\}", evaluate, value[1:])


def send(step: dict[str, Any], request: tuple[str, str, Any]) -> httpx.Response:
    """One HTTP Request node's request, tried as its Retry On Fail settings say."""
    method, url, body = request
    tries = step["maxTries"] if step.get("retryOnFail") else 1
    for attempt in range(1, tries + 1):
        response = httpx.request(method, url, json=body, timeout=30)
        if response.is_success or attempt == tries:
            return response
        time.sleep(step["waitBetweenTries"] / 1000)
    raise AssertionError("unreachable")


def replay(settings: dict[str, str]) -> tuple[dict[str, dict], dict[str, tuple[str, str, Any]]]:
    """Run the manual branch as n8n would: the Settings node (its values replaced by `settings`), then each HTTP
    Request node's method, URL and JSON body, expressions resolved from the nodes before it. The nodes' outputs
    and the requests they sent, by node name."""
    [trigger] = of_type("manualTrigger")
    outputs: dict[str, dict] = {}
    requests: dict[str, tuple[str, str, Any]] = {}
    current: dict = {}
    for step in chain(trigger["name"]):
        parameters = step["parameters"]
        if step["type"] == "n8n-nodes-base.set":
            assigned = {a["name"]: a["value"] for a in parameters["assignments"]["assignments"]}
            assert assigned.keys() == settings.keys(), "the test sets every value of the Settings node"
            current = dict(settings)
        else:
            assert step["type"] == "n8n-nodes-base.httpRequest", step["type"]
            url = resolve(parameters["url"], outputs, current)
            assert url.startswith(settings["prefect_api_url"] + "/")
            body = None
            if parameters.get("sendBody"):
                assert parameters["specifyBody"] == "json"
                body = json.loads(resolve(parameters["jsonBody"], outputs, current))
            requests[step["name"]] = (parameters.get("method", "GET"), url, body)
            response = send(step, requests[step["name"]])
            assert response.is_success, f"{step['name']}: {response.status_code} {response.text}"
            current = response.json()
        outputs[step["name"]] = current
    return outputs, requests


def test_the_n8n_workflow_starts_a_job_that_calls_its_webhook_back(served, llm_server):
    llm_server.reset(Script(verdicts=[NOT_YET, DONE]))
    [webhook] = of_type("webhook")
    assert webhook["parameters"]["httpMethod"] == "POST" and webhook["parameters"]["options"]["rawBody"] is True
    assert [n["name"] for n in chain(webhook["name"])] == ["Verify signature"]
    assert [n["name"] for n in of_type("httpRequest")] == ["Find deployment", "Create flow run"]
    assert all(n["retryOnFail"] for n in of_type("httpRequest"))
    receiver = Receiver()
    server = ThreadedServer(receiver.app).start()
    try:
        outputs, requests = replay({"prefect_api_url": served["api_url"], "n8n_url": server.url})
        assert outputs["Create flow run"]["parameters"]["callback_url"] == (
            f"{server.url}/webhook/{webhook['parameters']['path']}")
        flow_run_id = outputs["Create flow run"]["id"]
        again = send(node("Create flow run"), requests["Create flow run"])
        assert again.json()["id"] == flow_run_id, "a retried create_flow_run (same execution) is the same run"
        assert wait_final(served, flow_run_id) == "COMPLETED"
        deadline = time.monotonic() + 30
        while not receiver.requests:
            assert time.monotonic() < deadline, served["worker"].log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.5)  # a second callback would come now
    finally:
        server.stop()
    [request] = receiver.requests
    assert request["path"] == f"/webhook/{webhook['parameters']['path']}"
    assert_signed(request)
    assert request["headers"]["x-factory-delivery"] == flow_run_id
    result = json.loads(request["body"])
    assert result["status"] == "CONVERGED" and result["job_id"] == flow_run_id
    assert result == stored_result(result), "the callback carries the JobResult the job wrote"


CODE = node("Verify signature")["parameters"]["jsCode"]
PLACEHOLDER = "'replace-with-your-factory-callback-secret'"


def test_the_code_node_signs_what_the_factory_signs():
    """String checks of the Code node's JavaScript: n8n itself needs Node 24, which the test machine lacks."""
    for needed in ("require('crypto')", f"const SECRET = {PLACEHOLDER}",
                   "headers['x-factory-signature']", "getBinaryDataBuffer(0, 'data')",
                   "createHmac('sha256', SECRET).update(t + '.').update(body).digest('hex')",
                   "crypto.timingSafeEqual(given, wanted)", "MAX_AGE_S = 300", "headers['x-factory-delivery']"):
        assert needed in CODE, needed


HARNESS = """
const fs = require('fs');
const [code, input] = [fs.readFileSync(process.argv[2], 'utf8'), JSON.parse(fs.readFileSync(process.argv[3]))];
const item = { json: { headers: input.headers, params: {}, query: {}, body: {} } };
const raw = Buffer.from(input.body, 'base64');
const $input = { first: () => item, all: () => [item] };
const run = new Function('$input', 'require', `return (async function () {\\n${code}\\n}).call(this);`);
run.call({ helpers: { getBinaryDataBuffer: async () => raw } }, $input, require)
  .then((out) => console.log(JSON.stringify(out)), (error) => console.log(JSON.stringify({ error: error.message })));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="no Node.js to run the Code node's JavaScript with")
def test_the_code_node_accepts_what_the_readme_accepts(tmp_path):
    """The Code node's JavaScript run by plain Node (n8n's `$input` and `this.helpers` stubbed), the secret set as
    the n8n README says: it agrees with the README's `verify_signature` on a good, a forged and a stale callback."""
    (tmp_path / "harness.js").write_text(HARNESS)
    (tmp_path / "code.js").write_text(CODE.replace(PLACEHOLDER, json.dumps(SECRET)))
    body = b'{"job_id": "n8n-1", "status": "CONVERGED", "total_cost_usd": 0.0123}'
    now = int(time.time())
    cases = {"good": (signature(SECRET, body, now), body), "tampered": (signature(SECRET, body, now), body + b" "),
             "other secret": (signature("another-secret", body, now), body),
             "stale": (signature(SECRET, body, now - 3600), body), "garbage": ("t=abc,v1=00", body)}
    for case, (header, sent) in cases.items():
        (tmp_path / "input.json").write_text(json.dumps({
            "headers": {"x-factory-signature": header, "x-factory-delivery": "run-1"},
            "body": base64.b64encode(sent).decode()}))
        ran = subprocess.run(["node", str(tmp_path / "harness.js"), str(tmp_path / "code.js"),
                              str(tmp_path / "input.json")], capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0, ran.stderr
        out = json.loads(ran.stdout)
        accepted = verify_signature(SECRET, header, sent)
        assert accepted is (case == "good"), case
        if accepted:
            assert out == [{"json": {"verified": True, "delivery": "run-1", "result": json.loads(body)}}]
        else:
            assert "X-Factory-Signature does not sign this body" in out["error"], (case, out)


# --- the schedule in prefect.yaml --------------------------------------------------------------------------------


def flow_runs(api_url: str, deployment_id: str) -> list[dict[str, Any]]:
    response = prefect("POST", f"{api_url}/flow_runs/filter",
                       {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
    response.raise_for_status()
    return response.json()


def test_the_example_schedule_is_off_and_an_active_one_runs_the_job(served, llm_server):
    api = served["api_url"]
    deployment = prefect("GET", f"{api}/deployments/name/factory/job").json()
    [example] = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]["schedules"]
    [schedule] = deployment["schedules"]
    assert schedule["active"] is False and schedule["slug"] == example["slug"]
    assert schedule["schedule"]["cron"] == example["cron"] and schedule["parameters"] == example["parameters"]
    assert not [r for r in flow_runs(api, deployment["id"]) if r["auto_scheduled"]], "an inactive schedule runs nothing"

    llm_server.reset(Script(verdicts=[NOT_YET, DONE]))
    params = {"seed": "Write a haiku about the hour.", "objective": "A haiku about the hour.",
              "limits": {"max_cycles": 3}}
    # Hourly, anchored 3 s from now: one run within the test, the next an hour away.
    anchor = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    created = prefect("POST", f"{api}/deployments/{deployment['id']}/schedules", [{
        "schedule": {"interval": 3600, "anchor_date": anchor.isoformat(), "timezone": "UTC"},
        "active": True, "parameters": params, "slug": "test-hourly"}])
    assert created.status_code == 201, created.text
    [ours] = created.json()
    try:
        deadline = time.monotonic() + 60
        while not (runs := [r for r in flow_runs(api, deployment["id"])
                            if (r["created_by"] or {}).get("id") == ours["id"]]):
            assert time.monotonic() < deadline, "the scheduler scheduled no run"
            time.sleep(0.5)
        first = min(runs, key=lambda r: r["expected_start_time"])
        assert first["auto_scheduled"] and first["parameters"] == params
        assert wait_final(served, first["id"]) == "COMPLETED"
    finally:
        deleted = prefect("DELETE", f"{api}/deployments/{deployment['id']}/schedules/{ours['id']}")
    assert deleted.status_code == 204, deleted.text
    assert not [r for r in flow_runs(api, deployment["id"]) if r["state"]["type"] == "SCHEDULED"], (
        "deleting the schedule deletes the runs it had scheduled")
    result = json.loads((served["storage"] / first["id"] / "result.json").read_text())
    assert result["status"] == "CONVERGED" and result["job_id"] == first["id"]
