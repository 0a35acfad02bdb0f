"""The Factory's exceptions: one small hierarchy, so callers catch by meaning.

Foreign errors (SDKs, storage) are translated to these at one boundary each, with
``raise ... from exc``. Messages say what failed, the value, and what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from factory.models import Usage


class FactoryError(Exception):
    """Base of every error the Factory raises on purpose."""


class ConfigurationError(FactoryError, ValueError):
    """A job's input or the deployment's settings cannot work; nothing was spent."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"`{field}`: {message}")


class JobFailed(FactoryError):
    """A job stopped with ERROR; its result and log were written first, and the message says where."""


class StorageError(FactoryError):
    """An artifact, log or input ref could not be read or written."""


class ObjectNotFound(StorageError):
    """A ref names nothing that exists."""


class StorageSpooled(StorageError):
    """S3 stayed unreachable: the object was kept in the local spool instead."""

    def __init__(self, ref: str, spool_path: Path, reason: str) -> None:
        self.ref = ref
        self.spool_path = spool_path
        super().__init__(f"{reason}; {ref} was kept at {spool_path}. Re-run the job with the same job_id "
                         f"once the store is back: the spool is uploaded first and no model call is repeated.")


class BudgetExceeded(FactoryError):
    """The next call's worst-case cost does not fit in what is left of the budget."""

    def __init__(self, needed_usd: float, left_usd: float, what: str) -> None:
        self.needed_usd = needed_usd
        self.left_usd = left_usd
        super().__init__(
            f"{what} could cost up to ${needed_usd:.6f} but only ${left_usd:.6f} of the budget is left"
        )


class DeadlineExceeded(FactoryError):
    """The job's `limits.timeout_minutes` ran out before or during a step."""


class ProviderError(FactoryError):
    """A model provider refused or failed a call.

    A call can fail after the provider billed it (a reply that did not parse, a download that broke after the
    generation was paid for, a timeout after the request was sent): `billed` is what it was billed when the
    reply said so, and `billed_unknown` marks a call that may have been billed for an amount nobody can read,
    which is charged its worst case.
    """

    def __init__(self, model: str, message: str, *, billed: Usage | None = None,
                 billed_unknown: bool = False) -> None:
        self.model = model
        self.billed = billed
        self.billed_unknown = billed_unknown and billed is None
        super().__init__(f"model '{model}': {message}")


class TransientProviderError(ProviderError):
    """Worth retrying: rate limit, overload, 5xx, timeout, dropped connection, garbled body."""

    def __init__(self, model: str, message: str, retry_after_s: float | None = None, *,
                 billed: Usage | None = None, billed_unknown: bool = False) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(model, message, billed=billed, billed_unknown=billed_unknown)


class ProviderAuthError(ProviderError):
    """The key was refused (401/403). Retrying cannot help."""


class ProviderRequestError(ProviderError):
    """The provider rejected the request itself (400/404/422). Retrying cannot help."""
