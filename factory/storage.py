"""Where artifacts, logs and input refs live: a local root that refs may not escape.

A local ref is a path relative to the storage root, an absolute path inside it, or a
`file://` URL inside it. Anything that resolves outside the root is refused, so a run
triggered through the API cannot write wherever the worker can.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from factory.errors import ConfigurationError, StorageError


class LocalStorage:
    """Files under one root directory, written atomically (a crash never leaves half a file)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()

    def resolve(self, ref: str, field: str) -> Path:
        """The path a ref names, refusing anything outside the root.

        Raises:
            ConfigurationError: naming `field`, when the ref escapes the root or is not local.
        """
        if "://" in ref and not ref.startswith("file://"):
            scheme = ref.split("://", 1)[0]
            raise ConfigurationError(field, f"'{ref}': the '{scheme}://' scheme is not supported; use a local path.")
        raw = Path(ref.removeprefix("file://")).expanduser()
        path = (raw if raw.is_absolute() else self.root / raw).resolve()
        if not path.is_relative_to(self.root):
            raise ConfigurationError(
                field, f"'{ref}' is outside the storage root {self.root}. Use a path under it, or set "
                f"FACTORY_STORAGE_ROOT on the worker.")
        return path

    def ref(self, path: Path) -> str:
        return str(path)

    async def write(self, path: Path, data: bytes) -> None:
        await asyncio.to_thread(_atomic_write, path, data)

    async def read(self, path: Path) -> bytes:
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
