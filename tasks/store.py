"""`store_artifact`: write one iteration's artifact where the job's refs say."""

from __future__ import annotations

from prefect import task

from factory.artifacts import sha256
from factory.storage import Location, get_storage


@task(name="store_artifact", task_run_name="store-{location.name}")
async def store_artifact(location: Location, data: bytes) -> str:
    """Write `data` to `location` and return its sha256.

    Storage retries transient S3 faults itself (for FACTORY_STORAGE_RETRY_WINDOW_S), so the
    task does not retry: one layer only.

    Raises:
        StorageSpooled: S3 stayed unreachable; the bytes are in the local spool.
        StorageError: a local write failed.
    """
    await get_storage().write(location, data)
    return sha256(data)
