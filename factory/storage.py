"""Where artifacts, logs and input refs live: a local root, or S3 through prefect-aws.

A ref is `s3://bucket/key`, or a local path: relative to the storage root, absolute inside it, or
a `file:///path` URL inside it. Refs come from whoever can create a run, so `resolve` refuses what
could reach outside: a local ref that resolves outside the root (or into its spool), an S3 bucket
name that breaks S3's rules, a key with a leading `/`, an empty, `.` or `..` segment, a control
character or a backslash, or more than `MAX_REF_KEY_BYTES`.

When S3 stays unreachable a write lands in the local spool (`<root>/.spool/<bucket>/<key>`) and
raises `StorageSpooled`; `drain_spool` uploads what is there, which a re-run does first. Spool paths
are confined to the spool a second time, after symlinks, whatever built the location.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from factory.errors import ConfigurationError, ObjectNotFound, StorageError, StorageSpooled
from factory.s3 import S3Store
from factory.settings import get_settings

S3_KEY_MAX_BYTES = 1024  # S3's own limit on a key, in UTF-8 bytes
# What a job may add to a ref's key: `<stem>-iterations/iteration-50.webp` beside a file ref, `iteration-01.md`
# or `log.json` under a folder ref. Refs keep this much room so no derived key passes S3's limit mid-job.
CHILD_NAME_RESERVE_BYTES = 64
MAX_REF_KEY_BYTES = S3_KEY_MAX_BYTES - CHILD_NAME_RESERVE_BYTES
# S3's naming rules (3-63 lowercase letters, digits, dots, hyphens; a letter or digit at each end; no "..").
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")
SPOOL_DIR = ".spool"
CONTENT_TYPES = {".md": "text/markdown; charset=utf-8", ".json": "application/json",
                 ".txt": "text/plain; charset=utf-8", ".py": "text/x-python; charset=utf-8"}


@dataclass(frozen=True)
class Location:
    """A resolved ref: a local path, or an S3 bucket and key."""

    ref: str
    path: Path | None = None
    bucket: str | None = None
    key: str | None = None

    def child(self, name: str) -> Location:
        """The location `name` inside this one."""
        if self.path is not None:
            return Location(ref=str(self.path / name), path=self.path / name)
        key = f"{self.key.rstrip('/')}/{name}" if self.key else name
        return Location(ref=f"s3://{self.bucket}/{key}", bucket=self.bucket, key=key)

    def sibling(self, name: str) -> Location:
        """The location `name` beside this one, in the same folder."""
        if self.path is not None:
            return Location(ref=str(self.path.parent / name), path=self.path.parent / name)
        parent = str(PurePosixPath(self.key or "").parent)
        key = name if parent == "." else f"{parent}/{name}"
        return Location(ref=f"s3://{self.bucket}/{key}", bucket=self.bucket, key=key)

    def s3_object(self) -> tuple[str, str]:
        """The bucket and key of an S3 location."""
        if self.bucket is None or self.key is None:
            raise ValueError(f"{self.ref} is not an S3 object")
        return self.bucket, self.key

    @property
    def name(self) -> str:
        """The last segment of the path or key."""
        return PurePosixPath(self.path.name if self.path else self.key or "").name

    @property
    def suffix(self) -> str:
        """The last segment's extension (`.json`), or ''."""
        return PurePosixPath(self.path.name if self.path else self.key or "").suffix

    @property
    def stem(self) -> str:
        """The last segment without its extension."""
        return PurePosixPath(self.path.name if self.path else self.key or "").stem


def content_type(name: str) -> str:
    """The Content-Type an object is stored with, from its name's extension."""
    suffix = PurePosixPath(name).suffix
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


class Storage:
    """Local files under one root (written atomically) and S3 objects, behind one interface."""

    def __init__(self, root: Path, s3: S3Store) -> None:
        self.root = root.expanduser().resolve()
        self.spool = self.root / SPOOL_DIR
        self.s3 = s3

    def resolve(self, ref: str, field: str) -> Location:
        """The location a ref names.

        Args:
            ref: `s3://bucket/key`, a path relative to the root or absolute inside it, or `file:///path`.
            field: the parameter the ref came from, named in any error (`output_ref`, `input_refs[3]`).

        Returns:
            A Location: a path under the root, or a bucket and key.

        Raises:
            ConfigurationError: naming `field`, when the ref is malformed, ambiguous, escapes the root or
                names an unknown scheme.

        Example:
            >>> storage.resolve("s3://factory/jobs/a/", "output_ref").key
            'jobs/a/'
        """
        if problem := text_problem(ref):
            raise ConfigurationError(field, f"{ref!r} {problem}.")
        if ref.startswith("s3://"):
            bucket, _, key = ref[5:].partition("/")
            if not bucket:
                raise ConfigurationError(field, f"{ref!r} names no bucket; write s3://bucket/prefix.")
            if problem := bucket_problem(bucket) or key_problem(key, MAX_REF_KEY_BYTES):
                raise ConfigurationError(field, f"{ref!r}: {problem}.")
            return Location(ref=ref, bucket=bucket, key=key)
        if "://" in ref and not ref.startswith("file://"):
            scheme = ref.split("://", 1)[0]
            raise ConfigurationError(field, f"{ref!r}: the '{scheme}://' scheme is not supported; use s3:// or a "
                                            f"local path.")
        if WINDOWS_DRIVE.match(ref):
            raise ConfigurationError(field, f"{ref!r} looks like a Windows path; write a POSIX path on the worker.")
        try:
            raw = Path(_file_url_path(ref, field) if ref.startswith("file://") else ref).expanduser()
            path = (raw if raw.is_absolute() else self.root / raw).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: an unknown ~user, or a symlink loop
            raise ConfigurationError(field, f"{ref!r} cannot be resolved: {exc}.") from exc
        if not path.is_relative_to(self.root):
            raise ConfigurationError(
                field, f"{ref!r} is outside the storage root {self.root}. Use a path under it, or set "
                f"FACTORY_STORAGE_ROOT on the worker.")
        if path.is_relative_to(self.spool):
            raise ConfigurationError(field, f"{ref!r} is inside the spool {self.spool}, which only the Factory "
                                            f"writes; use another path under {self.root}.")
        return Location(ref=str(path), path=path)

    def spool_path(self, location: Location) -> Path:
        """Where an S3 object is kept while the store is unreachable: `<root>/.spool/<bucket>/<key>`.

        Raises:
            StorageError: the location names no object, or its path would land outside the spool (a key built
                past `resolve`, or a symlink in the spool): nothing is written.
        """
        bucket, key = location.bucket or "", location.key or ""
        if not key or key.endswith("/"):
            raise StorageError(f"cannot spool {location.ref!r}: it names no object (the key is empty or ends "
                               f"in '/').")
        path = self.spool / bucket / key
        try:
            real, spool = path.resolve(), self.spool.resolve()
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte
            raise StorageError(f"cannot spool {location.ref!r}: {exc}") from exc
        # Checked after symlinks: `spool / "/tmp/x"` is "/tmp/x", and a linked folder could point anywhere.
        inside = real.is_relative_to(spool / bucket) and len(real.relative_to(spool).parts) >= 2
        if bucket_problem(bucket) or not inside:
            raise StorageError(f"cannot spool {location.ref!r}: {path} is outside the spool {spool}; nothing "
                               f"was written.")
        return path

    async def write_spooled(self, location: Location, data: bytes) -> None:
        """Write straight to the spool (S3) or the file (local): for a job already known to be degraded."""
        await asyncio.to_thread(_atomic_write, location.path or self.spool_path(location), data)

    async def write(self, location: Location, data: bytes) -> None:
        """Write the whole object; an S3 write that keeps failing is spooled locally and raises.

        Raises:
            StorageSpooled: S3 stayed unreachable; the bytes are safe at `.spool_path`.
            StorageError: a local write failed, or the spool refused the location (nothing was written).
        """
        if location.path is not None:
            await asyncio.to_thread(_atomic_write, location.path, data)
            return
        try:
            bucket, key = location.s3_object()
            await self.s3.write(bucket, key, data, content_type(key))
        except StorageError as exc:
            spooled = self.spool_path(location)
            await asyncio.to_thread(_atomic_write, spooled, data)
            raise StorageSpooled(location.ref, spooled, str(exc)) from exc

    async def read(self, location: Location) -> bytes:
        """Read the whole object.

        Raises:
            ObjectNotFound: it does not exist.
            StorageError: it cannot be read, or S3 stayed unreachable.
        """
        if location.path is None:
            return await self.s3.read(*location.s3_object())
        try:
            return await asyncio.to_thread(location.path.read_bytes)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"cannot read {location.path}: it does not exist") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {location.path}: {exc.strerror}") from exc

    async def drain_spool(self) -> list[str]:
        """Upload every spooled object and remove it; returns the refs uploaded.

        Only regular files under the spool whose path makes a valid bucket and key are uploaded: a symlink
        (to a file or a folder) is never followed, so nothing outside the spool can be sent to S3.

        Raises:
            StorageError: S3 is still down; what was not uploaded stays spooled.
        """
        uploaded = []
        for path in await asyncio.to_thread(self._spooled_files):
            bucket, *parts = path.relative_to(self.spool).parts
            key = "/".join(parts)
            if not parts or bucket_problem(bucket) or key_problem(key, S3_KEY_MAX_BYTES):
                continue  # not something the Factory spooled: leave it for a person to look at
            try:
                data = await asyncio.to_thread(_read_no_follow, path)
            except OSError:  # drained by another worker meanwhile, or swapped for a link: not ours to send
                continue
            await self.s3.write(bucket, key, data, content_type(key))
            await asyncio.to_thread(path.unlink, missing_ok=True)
            uploaded.append(f"s3://{bucket}/{key}")
        return uploaded

    def _spooled_files(self) -> list[Path]:
        found = []
        for folder, _, names in os.walk(self.spool, followlinks=False):  # a linked folder is listed, not entered
            for name in names:
                path = Path(folder) / name
                try:
                    regular = stat.S_ISREG(path.lstat().st_mode)
                except FileNotFoundError:
                    continue
                if regular and not name.startswith("."):  # dot files: a write's temporary file
                    found.append(path)
        return sorted(found)


def text_problem(ref: str) -> str | None:
    """What makes a ref unsafe to name any file or object, or None."""
    if CONTROL_CHARACTERS.search(ref):
        return "holds a control character (such as NUL or a newline)"
    if "\\" in ref:
        return "holds a backslash, which some stores and tools read as a separator; use '/'"
    try:
        ref.encode()
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    return None


def bucket_problem(bucket: str) -> str | None:
    """Why `bucket` is not an S3 bucket name, or None."""
    if BUCKET_NAME.fullmatch(bucket) and ".." not in bucket:
        return None
    return (f"bucket {bucket!r} is not an S3 bucket name: 3-63 lowercase letters, digits, dots and hyphens, "
            f"starting and ending with a letter or digit")


def key_problem(key: str, max_bytes: int) -> str | None:
    """Why `key` cannot be an object key or prefix, or None. An empty key, or one trailing '/', names a folder."""
    if key.startswith("/"):
        return "the key starts with '/' (write s3://bucket/key, one slash)"
    if len(key.encode("utf-8", "surrogatepass")) > max_bytes:
        return (f"the key is {len(key.encode('utf-8', 'surrogatepass'))} bytes; at most {max_bytes} (S3 allows "
                f"{S3_KEY_MAX_BYTES}, and a job adds names such as iteration-01.md)")
    if problem := text_problem(key):
        return f"the key {problem}"
    segments = key.split("/")
    if any(not part for part in segments[:-1]):
        return "the key has an empty segment ('//')"
    if dots := next((part for part in segments if part in (".", "..")), None):
        return f"the key has a {dots!r} segment"
    return None


def _file_url_path(ref: str, field: str) -> str:
    host, slash, path = ref.removeprefix("file://").partition("/")
    if host or not slash:
        raise ConfigurationError(field, f"{ref!r}: a file URL here names no host (file:///absolute/path); or "
                                        f"write a plain path.")
    if set(path) & set("%?#"):
        raise ConfigurationError(field, f"{ref!r}: percent-escapes, '?' and '#' are not decoded in file URLs; "
                                        f"write a plain path.")
    return f"/{path}"


def _read_no_follow(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # the file may have been swapped for a link since the walk
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


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
