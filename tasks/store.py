"""`store_artifact`: write one iteration's artifact where the job's refs say."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from factory.artifacts import sha256
from factory.settings import get_settings
from factory.storage import LocalStorage


@task(name="store_artifact", task_run_name="store-{path.name}", retries=2, retry_delay_seconds=1)
async def store_artifact(path: Path, data: bytes) -> str:
    """Write `data` atomically to `path` (inside the storage root) and return its sha256.

    Raises:
        StorageError: the write failed after its retries.
    """
    await LocalStorage(get_settings().root).write(path, data)
    return sha256(data)
