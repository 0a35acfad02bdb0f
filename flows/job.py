"""The `factory` flow: one Factory job as a Prefect flow run.

Deployed as `factory/job` (see prefect.yaml) and run with::

    prefect deployment run factory/job --params '{"seed": "...", "objective": "..."}' --watch

Its parameters are the reference JobInput, flat; Prefect enforces their schema when a run is
created. The flow returns the JobResult, persisted as the run's result and written beside the log.
"""

from __future__ import annotations

from datetime import date

from prefect import flow, runtime
from prefect.logging import get_run_logger

from blocks.credentials import require_api_key
from factory.callback import check_callback_url
from factory.checks import Checks
from factory.errors import StorageError
from factory.eventlog import EventLog
from factory.models import (
    CallbackUrl,
    Candidates,
    Event,
    FunctionType,
    InputRefs,
    JobId,
    JobInput,
    JobResult,
    Limits,
    ModelName,
    Objective,
    Ref,
    Seed,
    utcnow,
)
from factory.preflight import plan_job
from factory.settings import get_settings
from factory.storage import get_storage
from flows.hooks import record_cancellation, record_completion, record_crash, record_failure
from flows.loop import JobRun


@flow(name="factory", persist_result=True, on_completion=[record_completion], on_cancellation=[record_cancellation],
      on_crashed=[record_crash], on_failure=[record_failure])
async def factory(
    seed: Seed,
    objective: Objective,
    function: FunctionType = FunctionType.TEXT_GENERATION,
    job_id: JobId = None,
    input_refs: InputRefs = [],  # noqa: B006 - Prefect copies parameters; the flow never mutates them
    output_ref: Ref | None = None,
    log_ref: Ref | None = None,
    limits: Limits = Limits(),  # noqa: B008 - immutable in practice: validated, never mutated
    executor_model: ModelName = None,
    evaluator_model: ModelName = None,
    callback_url: CallbackUrl = None,
    checks: Checks = [],  # noqa: B006 - Prefect copies parameters; the flow never mutates them
    candidates: Candidates = 1,
) -> JobResult:
    """Iterate executor -> evaluator until the artifact meets the objective or a limit is hit.

    Args:
        seed: the instruction for the executor.
        objective: what "done" means, for the evaluator.
        function: the kind of artifact.
        job_id: names the job; a re-run with the same id reuses every finished call. Default: the flow run id.
        input_refs: at most 20 local files (under the storage root) or s3:// objects, given to the executor as
            reference material (UTF-8 text, or PNG/JPEG/GIF/WebP images).
        output_ref: where iteration artifacts go (a folder), or a file that also receives the final artifact.
        log_ref: where the JSON event log goes. Default: `<root>/<job_id>/log.json`.
        limits: max_cycles, budget_usd, timeout_minutes, min_confidence.
        executor_model, evaluator_model: model names; `dry-run` needs no key.
        callback_url: receives the JobResult as a signed JSON POST when the job ends, however it ends (see
            flows/callback.py); a host that is not public is refused here, before anything is spent.
        checks: at most 20 deterministic checks (regex, length, json_schema, python) run on every artifact before
            the evaluator; one that fails skips the evaluator and goes back to the executor as feedback.
        candidates: best-of-K (1..8, text jobs): K executor calls at once per iteration, each checked and judged,
            the best carried forward; the budget holds the worst case of all K and their evaluation first.

    Returns:
        The JobResult.
    """
    created_at = utcnow()
    settings = get_settings()
    storage = get_storage()
    job = JobInput(
        seed=seed, objective=objective, function=function, job_id=job_id or str(runtime.flow_run.id),
        input_refs=input_refs, output_ref=output_ref, log_ref=log_ref, limits=limits,
        executor_model=executor_model, evaluator_model=evaluator_model, callback_url=callback_url,
        checks=checks, candidates=candidates,
    )
    warnings = await check_callback_url(job.callback_url, settings) if job.callback_url else []
    plan = await plan_job(job, settings, storage, date.today())
    await require_api_key(plan.executor.provider, "executor_model",
                          "a `diffusers:` model on the GPU pool" if plan.media_kind else None)
    await require_api_key(plan.evaluator.provider, "evaluator_model")
    if plan.transcriber is not None:  # audio is judged from its transcript
        await require_api_key(plan.transcriber.provider, "function")
    logger = get_run_logger()
    for warning in warnings + plan.warnings:
        logger.warning(warning)
    try:
        if uploaded := await storage.drain_spool():
            logger.info("Uploaded %d object(s) spooled while S3 was unreachable: %s", len(uploaded),
                        ", ".join(uploaded))
    except StorageError as exc:
        logger.warning("Spooled objects in %s could not be uploaded yet: %s", storage.spool, exc)
    log = await EventLog.open(storage, plan.log_path, job.job_id)
    # The flow run id marks where this run's events start: the state hooks find its own events (and tell its
    # result from an earlier run's of the same job_id) by it.
    await log.emit(Event.JOB_CREATED, job_id=job.job_id, flow_run_id=str(runtime.flow_run.id),
                   function=job.function.value,
                   limits=job.limits.model_dump(), input_refs=job.input_refs)
    logger.info("Job %s: executor %s, evaluator %s, budget $%.2f; log at %s", job.job_id, plan.executor.name,
                plan.evaluator.name, job.limits.budget_usd, plan.log_path.ref)
    result = await JobRun(plan=plan, settings=settings, log=log, created_at=created_at).run()
    logger.info("Job %s %s (%s) after %d iteration(s), $%.6f; result at %s", job.job_id, result.status.value,
                result.stop_reason.value, result.total_iterations, result.total_cost_usd, plan.result_path.ref)
    return result
