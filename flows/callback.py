"""The job's callback, sent from the flow's state hooks when the job ends: converged, exhausted, failed, cancelled
or crashed.

The body is the JobResult: the one the flow returned, else the one the loop wrote beside the log (if this flow run
wrote it), else one rebuilt from this run's events in the log (factory/callback.py `result_from_log`). Every
attempt goes into the job's event log (CALLBACK_SENT, CALLBACK_FAILED, after JOB_COMPLETED), the outcome into
the Prefect artifact `factory-<job>-callback`. Nothing here raises: a callback that fails changes neither the
job's state nor its money.
"""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.logging.loggers import flow_run_logger

from blocks.credentials import CALLBACK_SECRET_BLOCK, CALLBACK_SECRET_ENV, callback_secret
from factory.callback import reported, result_from_log, run_events, stored_result
from factory.errors import FactoryError, StorageError
from factory.eventlog import EventLog
from factory.models import Event, JobResult, StopReason, utcnow
from factory.preflight import log_path_for, result_path_for
from factory.settings import get_settings
from factory.storage import Storage, get_storage
from flows.report import artifact_key
from tasks.callback import Attempt, Delivery, send_callback


async def send_job_callback(flow_run: Any, state: Any, stop: StopReason, note: str | None = None) -> None:
    """POST the job's result to the run's `callback_url`, if it has one; idempotent per flow run.

    Args:
        flow_run, state: what Prefect hands the hook.
        stop: the stop reason to report if no JobResult of this run can be found (and its log says none).
        note: why the job ended, for a rebuilt result; default the state's message.
    """
    params = flow_run.parameters or {}
    if not params.get("callback_url"):
        return
    logger = flow_run_logger(flow_run)
    try:
        await _send(flow_run, state, params, stop, note, logger)
    except Exception as exc:  # noqa: BLE001 - a callback that fails must never change the job's state or money
        logger.error("The job's callback could not be sent: %r", exc)


async def _send(flow_run: Any, state: Any, params: dict[str, Any], stop: StopReason, note: str | None,
                logger: Any) -> None:
    job_id = str(params.get("job_id") or flow_run.id)
    storage = get_storage()
    log = await _open_log(storage, job_id, params.get("log_ref"))
    if log is not None and reported(log.events, flow_run.id):
        logger.info("The callback of this run was already sent; not sent again.")
        return
    run = run_events(log.events, flow_run.id) if log is not None else []
    result = await _job_result(flow_run, state, storage, log, run, job_id, params, stop, note)
    secret = await callback_secret()
    if secret is None:
        logger.warning("No callback secret (the Secret block `%s` or %s where the worker runs): the callback goes "
                       "without an X-Factory-Signature header, and its receiver cannot tell it from a forgery.",
                       CALLBACK_SECRET_BLOCK, CALLBACK_SECRET_ENV)

    async def record(attempt: Attempt) -> None:
        (logger.info if attempt.delivered else logger.warning)(
            "Callback attempt %d to %s: %s", attempt.attempt, attempt.url,
            f"delivered ({attempt.status_code})" if attempt.delivered else attempt.error)
        if log is None:
            return  # refused before the job had a log: the run's log and the artifact say it
        try:
            await log.emit(Event.CALLBACK_SENT if attempt.delivered else Event.CALLBACK_FAILED,
                           flow_run_id=str(flow_run.id), **attempt.record())
        except FactoryError as exc:
            logger.warning("Could not record the callback attempt in the event log: %s", exc)

    delivery = await send_callback(params["callback_url"], result.model_dump_json().encode(), secret,
                                   settings=get_settings(), delivery_id=str(flow_run.id), on_attempt=record)
    await _publish(flow_run.id, job_id, result, delivery)


async def _open_log(storage: Storage, job_id: str, log_ref: str | None) -> EventLog | None:
    """The job's log, if it has one: a run refused before it opened its log has none to write to."""
    try:
        log = await EventLog.open(storage, log_path_for(job_id, log_ref, storage), job_id)
    except FactoryError:
        return None
    return log if log.events else None


async def _job_result(flow_run: Any, state: Any, storage: Storage, log: EventLog | None,
                      run: list[dict[str, Any]], job_id: str, params: dict[str, Any], stop: StopReason,
                      note: str | None) -> JobResult:
    if state.is_completed():
        returned = await state.aresult(raise_on_failure=False)
        if isinstance(returned, JobResult):
            return returned
    if log is not None:
        try:
            stored = stored_result(await storage.read(result_path_for(log.location)), run)
        except StorageError:
            stored = None
        if stored is not None:
            return stored
    completed = [e for e in run if e.get("event") == Event.JOB_COMPLETED]
    if completed:  # what the log says the job ended with (its hook closed it) wins over the hook's guess
        try:
            stop = StopReason(completed[-1].get("data", {}).get("stop_reason"))
        except ValueError:
            pass
    return result_from_log(
        job_id, stop, run, note or getattr(state, "message", None) or "the flow run ended",
        created_at=getattr(flow_run, "created", None) or utcnow(), completed_at=utcnow(),
        executor_model=str(params.get("executor_model") or ""),
        evaluator_model=str(params.get("evaluator_model") or ""),
        log_ref=log.location.ref if log is not None else None)


async def _publish(flow_run_id: Any, job_id: str, result: JobResult, delivery: Delivery) -> None:
    """The outcome as the run's markdown artifact `factory-<job>-callback` (created with the run's id: a
    cancellation hook runs in the worker, outside the run's context)."""
    outcome = "delivered" if delivery.delivered else "not delivered"
    signed = ("signed (`X-Factory-Signature`)" if delivery.signed else
              f"**unsigned**: no secret (Secret block `{CALLBACK_SECRET_BLOCK}` or `{CALLBACK_SECRET_ENV}`)")
    lines = [f"# Callback of job `{job_id}`: {outcome}", "",
             f"**To:** `{_cell(delivery.url)}` · **Body:** the JobResult ({result.status.value}, "
             f"{result.stop_reason.value}), {signed}", "",
             "| attempt | address | answer | duration |", "|---|---|---|---|"]
    for attempt in delivery.attempts:
        answer = f"{attempt.status_code}" if attempt.delivered else attempt.error or f"{attempt.status_code}"
        lines.append(f"| {attempt.attempt} | {attempt.address or '-'} | {_cell(answer)} | {attempt.duration_ms} ms |")
    async with get_client() as client:
        await client.create_artifact(ArtifactCreate(
            key=artifact_key(job_id, "callback"), type="markdown", data="\n".join(lines),
            description=f"Callback {outcome} after {len(delivery.attempts)} attempt(s)", flow_run_id=flow_run_id))


def _cell(text: str) -> str:
    """Text that stays inside its table cell or code span: it may quote the URL a caller gave."""
    return text.replace("|", "\\|").replace("`", "%60").replace("\n", " ")
