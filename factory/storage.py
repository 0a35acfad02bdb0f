"""Where artifacts, logs and input refs live: a local root, or S3 through prefect-aws.

A ref is `s3://bucket/key`, or a local path: relative to the storage root, absolute inside it, or
a `file://` URL inside it. A local ref that resolves outside the root is refused, so a run
triggered through the API cannot write wherever the worker can.

When S3 stays unreachable a write lands in the local spool (`<root>/.spool/<bucket>/<key>`) and
raises `StorageSpooled`; `drain_spool` uploads what is there, which a re-run does first.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from factory.errors import ConfigurationError, ObjectNotFound, StorageError, StorageSpooled
from factory.s3 import S3Store
from factory.settings import get_settings

CONTENT_TYPES = {".md": "text/markdown; charset=utf-8", ".json": "application/json", ".txt": "text/plain; charset=utf-8",
                 ".py": "text/x-python; charset=utf-8"}


@dataclass(frozen=True)
class Location:
    """A resolved ref: a local path, or an S3 bucket and key."""

    ref: str
    path: Path | None = None
    bucket: str | None = None
    key: str | None = None

    def child(self, name: str) -> "Location":
        if self.path is not None:
            return Location(ref=str(self.path / name), path=self.path / name)
        key = f"{self.key.rstrip('/')}/{name}" if self.key else name
        return Location(ref=f"s3://{self.bucket}/{key}", bucket=self.bucket, key=key)

    def sibling(self, name: str) -> "Location":
        if self.path is not None:
            return Location(ref=str(self.path.parent / name), path=self.path.parent / name)
        parent = str(PurePosixPath(self.key).parent)
        key = name if parent == "." else f"{parent}/{name}"
        return Location(ref=f"s3://{self.bucket}/{key}", bucket=self.bucket, key=key)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path.name if self.path else self.key or "").name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path.name if self.path else self.key or "").suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path.name if self.path else self.key or "").stem


def content_type(name: str) -> str:
    suffix = PurePosixPath(name).suffix
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


class Storage:
    """Local files under one root (written atomically) and S3 objects, behind one interface."""

    def __init__(self, root: Path, s3: S3Store) -> None:
        self.root = root.expanduser().resolve()
        self.spool = self.root / ".spool"
        self.s3 = s3

    def resolve(self, ref: str, field: str) -> Location:
        """The location a ref names.

        Raises:
            ConfigurationError: naming `field`, when the ref escapes the root or its scheme is unknown.
        """
        if ref.startswith("s3://"):
            bucket, _, key = ref[5:].partition("/")
            if not bucket:
                raise ConfigurationError(field, f"'{ref}' names no bucket; write s3://bucket/prefix.")
            return Location(ref=ref, bucket=bucket, key=key)
        if "://" in ref and not ref.startswith("file://"):
            scheme = ref.split("://", 1)[0]
            raise ConfigurationError(field, f"'{ref}': the '{scheme}://' scheme is not supported; use s3:// or a "
                                            f"local path.")
        raw = Path(ref.removeprefix("file://")).expanduser()
        path = (raw if raw.is_absolute() else self.root / raw).resolve()
        if not path.is_relative_to(self.root):
            raise ConfigurationError(
                field, f"'{ref}' is outside the storage root {self.root}. Use a path under it, or set "
                f"FACTORY_STORAGE_ROOT on the worker.")
        return Location(ref=str(path), path=path)

    def spool_path(self, location: Location) -> Path:
        return self.spool / location.bucket / location.key

    async def write_spooled(self, location: Location, data: bytes) -> None:
        """Write straight to the spool (S3) or the file (local): for a job already known to be degraded."""
        await asyncio.to_thread(_atomic_write, location.path or self.spool_path(location), data)

    async def write(self, location: Location, data: bytes) -> None:
        """Write the whole object; an S3 write that keeps failing is spooled locally and raises.

        Raises:
            StorageSpooled: S3 stayed unreachable; the bytes are safe at `.spool_path`.
            StorageError: a local write failed.
        """
        if location.path is not None:
            await asyncio.to_thread(_atomic_write, location.path, data)
            return
        try:
            await self.s3.write(location.bucket, location.key, data, content_type(location.key))
        except StorageError as exc:
            spooled = self.spool_path(location)
            await asyncio.to_thread(_atomic_write, spooled, data)
            raise StorageSpooled(location.ref, spooled, str(exc)) from exc

    async def read(self, location: Location) -> bytes:
        if location.path is None:
            return await self.s3.read(location.bucket, location.key)
        try:
            return await asyncio.to_thread(location.path.read_bytes)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"cannot read {location.path}: it does not exist") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {location.path}: {exc.strerror}") from exc

    async def drain_spool(self) -> list[str]:
        """Upload every spooled object; returns the refs uploaded. Raises StorageError if S3 is still down."""
        uploaded = []
        for path in await asyncio.to_thread(self._spooled_files):
            bucket, key = path.relative_to(self.spool).parts[0], "/".join(path.relative_to(self.spool).parts[1:])
            await self.s3.write(bucket, key, await asyncio.to_thread(path.read_bytes), content_type(key))
            await asyncio.to_thread(path.unlink)
            uploaded.append(f"s3://{bucket}/{key}")
        return uploaded


    def _spooled_files(self) -> list[Path]:
        return sorted(p for p in self.spool.rglob("*") if p.is_file() and not p.name.startswith("."))


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


@lru_cache(maxsize=1)
def get_storage() -> Storage:
    """The process's storage, from settings: one S3 credentials look-up per worker process."""
    settings = get_settings()
    return Storage(settings.storage_root, S3Store(settings.s3_block, settings.storage_retry_window_s))
