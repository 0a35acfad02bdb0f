"""What the resident worker refuses, and how it loads flows, without a server."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
from prefect import flow_engine
from prefect.exceptions import TerminationSignal

from workers.inprocess import (
    FlowCache,
    InProcessJobConfiguration,
    RunControl,
    RunRefused,
    _patch_engine,
    _run_control,
    working_directory,
)

pytestmark = pytest.mark.fast


def configured(**variables) -> InProcessJobConfiguration:
    config = InProcessJobConfiguration(**variables)
    config._asked_env = {k: v for k, v in (config.env or {}).items() if v is not None}
    config._asked_command = config.command
    return config


def test_env_and_command_are_refused_naming_the_variable_not_its_value():
    refusal = configured(env={"ANTHROPIC_API_KEY": "sk-ant-secret"}).refusal()
    assert refusal is not None and "`env`" in refusal and "ANTHROPIC_API_KEY" in refusal
    assert "sk-ant-secret" not in refusal
    assert "`command`" in (configured(command="python -m evil").refusal() or "")
    assert configured().refusal() is None


def test_a_pull_step_that_fetches_code_is_refused_and_set_working_directory_is_followed(tmp_path):
    git = SimpleNamespace(pull_steps=[{"prefect.deployments.steps.git_clone": {"repository": "https://x/y.git"}}],
                          path=None)
    with pytest.raises(RunRefused, match="git_clone"):
        working_directory(git)
    here = SimpleNamespace(pull_steps=[{"prefect.deployments.steps.set_working_directory": {
        "directory": str(tmp_path)}}], path=None)
    assert working_directory(here) == tmp_path


async def test_a_flow_is_loaded_once_per_file_content_and_again_when_it_changes(tmp_path):
    script = tmp_path / "myflow.py"
    script.write_text("from prefect import flow\n\n@flow\nasync def job():\n    return 1\n")
    cache = FlowCache(size=2)
    first = await cache.load("myflow.py:job", tmp_path)
    assert await cache.load("myflow.py:job", tmp_path) is first
    script.write_text("from prefect import flow\n\n@flow\nasync def job():\n    return 2\n")
    changed = await cache.load("myflow.py:job", tmp_path)
    assert changed is not first and len(cache._flows) == 2
    for n in range(3):  # bounded: the least recently used goes
        other = tmp_path / f"other{n}.py"
        other.write_text(script.read_text())
        await cache.load(f"other{n}.py:job", tmp_path)
    assert len(cache._flows) == 2


@pytest.fixture
def patched_engine(monkeypatch):
    for name in ("capture_sigterm", "_termination_intent"):  # put back after the test
        monkeypatch.setattr(flow_engine, name, getattr(flow_engine, name))
    _patch_engine()


def test_a_cancelled_run_leaves_the_workers_signals_alone(patched_engine):
    # Prefect's engine ends a cancelled run with a TerminationSignal; its SIGTERM bridge would re-send SIGTERM to
    # the process, which here is the worker running every other job.
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(TerminationSignal), flow_engine.capture_sigterm():
            assert signal.getsignal(signal.SIGTERM) is handler
            raise TerminationSignal(signal.SIGTERM)
        assert received == []
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_cancel_intent_belongs_to_the_run_it_was_given_to(patched_engine):
    cancelled, running = RunControl(cancelling=True), RunControl()
    for control, intent in ((cancelled, "cancel"), (running, None)):
        token = _run_control.set(control)
        try:
            assert flow_engine._termination_intent() == intent
        finally:
            _run_control.reset(token)
