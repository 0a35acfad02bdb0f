"""State hooks of the `factory` flow: close the event log when Prefect cancels the run, a crash kills
it, or an unexpected error fails it; cancel the GPU generation runs it leaves behind; and, whatever
the end (completed too), send the job's callback when the run has a `callback_url` (flows/callback.py).

They run where Prefect runs them (the worker, after the flow's process ended), so they rebuild
the log's location from the run's parameters alone. The callback goes last and in a `finally`: it
reports what the other steps recorded, and is sent even if one of them failed.
"""

from __future__ import annotations

from typing import Any

from factory.errors import FactoryError
from factory.eventlog import EventLog
from factory.models import Event, JobStatus, StopReason
from factory.preflight import log_path_for
from factory.storage import get_storage
from flows.callback import send_job_callback
from flows.generation import cancel_gpu_children


async def _close_log(flow_run: Any, status: JobStatus, stop: StopReason | None, note: str) -> None:
    params = flow_run.parameters or {}
    job_id = params.get("job_id") or str(flow_run.id)
    storage = get_storage()
    try:
        location = log_path_for(job_id, params.get("log_ref"), storage)
        log = await EventLog.open(storage, location, job_id)
    except FactoryError:
        return  # the run was refused before it had a log, or its store is unreachable
    if not log.events or log.completed:
        return
    if stop is StopReason.ERROR:
        await log.emit(Event.JOB_ERROR, stop_reason=stop.value, detail=note)
    await log.emit(Event.JOB_COMPLETED, status=status.value, stop_reason=stop.value if stop else None, detail=note)


async def record_completion(flow: Any, flow_run: Any, state: Any) -> None:
    """The job returned its JobResult (converged or exhausted): only the callback is left to do."""
    await send_job_callback(flow_run, state, StopReason.ERROR, "the JobResult of the completed run is unreadable")


async def record_cancellation(flow: Any, flow_run: Any, state: Any) -> None:
    note = state.message or "cancelled through Prefect"
    try:
        await cancel_gpu_children(flow_run.id)  # a GPU generation in flight keeps billing until cancelled
        await _close_log(flow_run, JobStatus.CANCELLED, StopReason.CANCELLED, note)
    finally:
        await send_job_callback(flow_run, state, StopReason.CANCELLED, note)


async def record_crash(flow: Any, flow_run: Any, state: Any) -> None:
    note = f"the flow run crashed: {state.message or 'no message'}; re-run with the same job_id to resume"
    try:
        await cancel_gpu_children(flow_run.id)
        await _close_log(flow_run, JobStatus.FAILED, StopReason.ERROR, note)
    finally:
        await send_job_callback(flow_run, state, StopReason.ERROR, note)


async def record_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """A failure the loop did not record itself (it records its own before failing the run)."""
    note = f"the flow run failed: {state.message or 'no message'}; re-run with the same job_id to resume"
    try:
        await _close_log(flow_run, JobStatus.FAILED, StopReason.ERROR, note)
    finally:
        await send_job_callback(flow_run, state, StopReason.ERROR, state.message or "the flow run failed")
