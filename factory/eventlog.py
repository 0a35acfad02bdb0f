"""The job's JSON event log, rewritten atomically after every event so a crash leaves it readable.

Shape: `{"job_id": ..., "events": [{"timestamp": ISO-8601 UTC, "event": NAME, "data": {...}}]}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factory.models import Event, utcnow
from factory.storage import LocalStorage


class EventLog:
    def __init__(self, storage: LocalStorage, path: Path, job_id: str) -> None:
        self.storage = storage
        self.path = path
        self.job_id = job_id
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, storage: LocalStorage, path: Path, job_id: str) -> "EventLog":
        """The job's log, continuing the events of an earlier run of the same job if there are any."""
        log = cls(storage, path, job_id)
        if path.exists():
            try:
                log.events = json.loads(await storage.read(path)).get("events", [])
            except (ValueError, AttributeError):
                log.events = []  # an unreadable old log is replaced, not trusted
        return log

    @property
    def completed(self) -> bool:
        return bool(self.events) and self.events[-1]["event"] == Event.JOB_COMPLETED.value

    async def emit(self, event: Event, **data: Any) -> None:
        self.events.append({"timestamp": utcnow().isoformat(), "event": event.value, "data": data})
        await self.flush()

    async def flush(self) -> None:
        body = {"job_id": self.job_id, "events": self.events}
        # Compact JSON: the C encoder, ~10x faster than indent=2 on a log rewritten at every event.
        await self.storage.write(self.path, json.dumps(body, default=str).encode())
