"""The job's JSON event log, rewritten whole after every event so a crash leaves it readable.

Shape: `{"job_id": ..., "events": [{"timestamp": ISO-8601 UTC, "event": NAME, "data": {...}}]}`.
Once a write to S3 has been spooled, later writes go straight to the spool: the job is stopping,
and its log must still end complete.
"""

from __future__ import annotations

import json
from typing import Any

from factory.errors import ObjectNotFound, StorageSpooled
from factory.models import Event, utcnow
from factory.storage import Location, Storage

# What a job's state hooks may add after its JOB_COMPLETED: they report the end, they do not reopen the job.
AFTER_COMPLETION = frozenset({Event.CALLBACK_SENT.value, Event.CALLBACK_FAILED.value})


class EventLog:
    """One job's event log: its events in memory, written whole to `location` after each one.

    The flow (flows/job.py) opens it with `open` once the job is planned, before its first event, and
    hands it to the loop (`JobRun`, flows/loop.py), which emits an event at every step and ends with
    JOB_COMPLETED. The state hooks (flows/hooks.py, flows/callback.py) reopen it after the run, to close a
    log a cancel or crash left open and to record the callback. A re-run with the same job_id continues
    the same log. Once a write has been spooled (`spooled` holds why), every later write goes straight
    to the spool.
    """

    def __init__(self, storage: Storage, location: Location, job_id: str) -> None:
        self.storage = storage
        self.location = location
        self.job_id = job_id
        self.events: list[dict[str, Any]] = []
        self.spooled: StorageSpooled | None = None

    @classmethod
    async def open(cls, storage: Storage, location: Location, job_id: str) -> EventLog:
        """The job's log, continuing the events of an earlier run of the same job if there are any."""
        log = cls(storage, location, job_id)
        try:
            log.events = json.loads(await storage.read(location)).get("events", [])
        except ObjectNotFound:
            pass
        except (ValueError, AttributeError):
            log.events = []  # an unreadable old log is replaced, not trusted
        return log

    @property
    def completed(self) -> bool:
        """Whether the last event, callback events aside, is JOB_COMPLETED: the job's log is closed."""
        last = next((e["event"] for e in reversed(self.events) if e["event"] not in AFTER_COMPLETION), None)
        return last == Event.JOB_COMPLETED.value

    async def emit(self, event: Event, **data: Any) -> None:
        """Append `event`, timestamped now with `data` as its fields, and rewrite the log."""
        self.events.append({"timestamp": utcnow().isoformat(), "event": event.value, "data": data})
        await self.flush()

    async def flush(self) -> None:
        """Rewrite the whole log.

        Raises:
            StorageSpooled: the first write S3 did not take (the log is safe in the spool; later writes go there).
            StorageError: the write failed and nothing was written.
        """
        # Compact JSON: the C encoder, ~10x faster than indent=2 on a log rewritten at every event.
        body = json.dumps({"job_id": self.job_id, "events": self.events}, default=str).encode()
        if self.spooled is not None:
            await self.storage.write_spooled(self.location, body)
            return
        try:
            await self.storage.write(self.location, body)
        except StorageSpooled as exc:
            self.spooled = exc
            raise
