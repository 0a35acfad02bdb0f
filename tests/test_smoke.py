from factory.models import JobStatus, StopReason
from flows.job import factory


async def test_dry_run_converges(factory_env):
    result = await factory(seed="Write a haiku", objective="A haiku", executor_model="dry-run",
                           evaluator_model="dry-run")
    assert result.status is JobStatus.CONVERGED
    assert result.stop_reason is StopReason.CONFORMITY
    assert result.total_iterations == 2
    assert result.dry_run
