"""What the resident worker refuses, and how it loads flows, without a server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from workers.inprocess import FlowCache, InProcessJobConfiguration, RunRefused, working_directory

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
