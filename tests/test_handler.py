"""handler.py, the RunPod serverless entry: it runs only the commands the `runpod` worker sends, with no
variable that changes how a program starts; and a local run that succeeds logs no error.

The command checks call the handler as RunPod does, in this process, with an image PATH whose `prefect`
and `python` only record that they were started (and with what): a refused request leaves no record.
The whole runs (worker -> emulator -> handler) are in test_runpod.py and test_gpu_generation.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import handler
from tests.emulators.runpod import REPO

BUNDLE = "python -m prefect_aws.experimental.bundles.execute --bucket factory --aws-credentials-block-name " \
         "factory-aws --key 0b7c"
FLOW_RUN = "prefect flow-run execute"
FLOW_RUN_ENV = {"PREFECT__FLOW_RUN_ID": "5f0c4a4e-2d7a-4c55-a2b3-0e3c5d6f7a81",
                "PREFECT_API_URL": "http://127.0.0.1:9/api", "FACTORY_DIFFUSERS_STEPS": "2"}
HANDLER_CLI_TIMEOUT_S = 420  # a cold temporary Prefect server migrates its database first
LOGGED_ERROR = re.compile(r"(^|\|)\s*(ERROR|CRITICAL)\s+\|")


@pytest.fixture
def ran(tmp_path, monkeypatch) -> Path:
    """A record file written by the image's `prefect` and `python` (first on its PATH) when started."""
    record = tmp_path / "ran"
    bin_dir = tmp_path / "image-bin"
    bin_dir.mkdir()
    for program in ("prefect", "python"):
        script = bin_dir / program
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0 $*" "$PREFECT__FLOW_RUN_ID" > "{record}"\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


@pytest.mark.parametrize("command", [FLOW_RUN, BUNDLE], ids=["flow-run", "bundle"])
async def test_the_commands_the_worker_sends_run_with_their_environment(ran, command):
    reply = await handler.handler({"id": "rp-ok", "input": {"command": command, "env": FLOW_RUN_ENV}})
    assert reply == {"exit_code": 0}
    program, flow_run_id = ran.read_text().splitlines()
    assert program.endswith(command.split(" ", 1)[1]) and flow_run_id == FLOW_RUN_ENV["PREFECT__FLOW_RUN_ID"]


@pytest.mark.parametrize("command", [
    "sh -c 'touch {marker}'",
    "/bin/sh -c 'touch {marker}'",
    "python -c \"open('{marker}', 'w')\"",
    "prefect flow-run execute; touch {marker}",
    "prefect deployment run factory/job",
    "python -m http.server",
    "python -X importtime -m prefect_aws.experimental.bundles.execute --bucket b --key k",
    "python -m prefect_aws.experimental.bundles.execute --bucket b --key k --extra x",
    "python -m prefect_aws.experimental.bundles.execute --bucket b",
    "uv run --with evil -m prefect_aws.experimental.bundles.execute --bucket b --key k",
    "",
])
async def test_any_other_command_is_refused_and_nothing_runs(ran, tmp_path, command):
    marker = tmp_path / "marker"
    command = command.format(marker=marker)
    reply = await handler.handler({"id": "rp-cmd", "input": {"command": command, "env": FLOW_RUN_ENV}})
    assert reply["status"] == "error" and reply["error"].startswith("refused, nothing was run: `input.command`: ")
    assert not ran.exists() and not marker.exists()


@pytest.mark.parametrize("name, value", [
    ("PATH", "/tmp/attacker-bin"), ("LD_PRELOAD", "/tmp/evil.so"), ("LD_LIBRARY_PATH", "/tmp"),
    ("LD_AUDIT", "/tmp/evil.so"), ("DYLD_INSERT_LIBRARIES", "/tmp/evil.dylib"), ("GCONV_PATH", "/tmp"),
    ("GLIBC_TUNABLES", "glibc.malloc.check=3"), ("PYTHONPATH", "/tmp"), ("PYTHONSTARTUP", "/tmp/evil.py"),
    ("PYTHONHOME", "/tmp"), ("PYTHONINSPECT", "1"), ("BASH_ENV", "/tmp/evil.sh"), ("ENV", "/tmp/evil.sh"),
    ("ld_preload", "/tmp/evil.so"),
])
async def test_env_that_changes_how_a_program_starts_is_refused_and_nothing_runs(ran, name, value):
    reply = await handler.handler({"id": "rp-env", "input": {"command": FLOW_RUN,
                                                             "env": {**FLOW_RUN_ENV, name: value}}})
    assert reply == {"status": "error", "error": f"refused, nothing was run: `input.env.{name}`: refused, it "
                     "changes which program starts or what it loads; set it in the image (Dockerfile) instead"}
    assert not ran.exists()


async def test_every_problem_is_named_at_once(ran):
    reply = await handler.handler({"id": "rp-all", "input": {"command": "sh -c id",
                                                             "env": {"PATH": "/x", "PYTHONPATH": "/y", "A=B": "1"}}})
    assert reply["status"] == "error"
    for field in ("`input.command`: `sh -c id` is not a command the `runpod` worker sends", "`input.env.PATH`",
                  "`input.env.PYTHONPATH`", "`input.env.A=B`: not a variable name"):
        assert field in reply["error"]
    assert not ran.exists()


def test_a_local_run_that_succeeds_logs_no_error(tmp_path):
    """The README's local run, as a user types it (no Prefect API: Prefect starts a temporary server): it
    ends in success, and nothing it prints is an error or a traceback."""
    test_input = {"input": {"seed": "Write a haiku", "objective": "Three lines", "executor_model": "dry-run",
                            "evaluator_model": "dry-run"}}
    # The user sets none of these (this session does, and importing handler.py does).
    test_settings = ("PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED",
                     "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    env = {name: value for name, value in os.environ.items() if name not in test_settings}
    env.update({"PREFECT_HOME": str(tmp_path / "home"), "FACTORY_STORAGE_ROOT": str(tmp_path / "store")})
    out = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(test_input)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=HANDLER_CLI_TIMEOUT_S)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "Job local_test completed successfully." in text and "'status': 'success'" in text, text[-4000:]
    assert "'status': 'CONVERGED'" in text
    errors = [line for line in text.splitlines() if LOGGED_ERROR.search(line) or "Traceback" in line]
    assert errors == [], text[-6000:]
