"""`check_artifact`: run a job's deterministic checks on one stored artifact."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from factory.checks import Check, CheckResult, run_checks


# Not cached: checks cost nothing, and a re-run must judge the artifact under the worker's current rules
# (FACTORY_ALLOW_CODE_CHECKS may have changed). No Prefect retries: a check that fails is a result, not a fault.
@task(name="check_artifact", task_run_name="check-iteration-{iteration}", cache_policy=NO_CACHE)
async def check_artifact(iteration: int, checks: list[Check], artifact: str, allow_code: bool) -> list[CheckResult]:
    """Every check's result on the artifact's text, in order (python checks in the sandbox)."""
    return await run_checks(checks, artifact, allow_code=allow_code)
