"""Objects in S3 or any S3-compatible store, through prefect-aws.

Credentials and endpoint come from the `S3Bucket` block named by `FACTORY_S3_BLOCK` (default
`factory-s3`, created by `python -m blocks.register`); without it, from the environment boto3
reads (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL_S3`). boto3
is blocking, so every call runs in a worker thread, as prefect-aws does.

One layer of retries: boto3 makes one attempt per call (`total_max_attempts=1`) with its own connect
and read timeouts, and `_retrying` retries transient faults for the window. An attempt's timeouts are
cut to what is left of the window, so a store that accepts connections and never answers cannot
hold a job past it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from io import BytesIO
from typing import TYPE_CHECKING, Any, TypeVar

from prefect.utilities.asyncutils import run_sync_in_worker_thread

from factory.errors import ObjectNotFound, StorageError

T = TypeVar("T")

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials, MinIOCredentials

NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
RETRY_FIRST_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 2.0
# botocore's defaults: 60 s each, per attempt, and retries of its own on top of ours (legacy mode: 4).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0  # per socket read or write: a large object that keeps moving is not cut off
ATTEMPT_TIMEOUT_S = CONNECT_TIMEOUT_S + READ_TIMEOUT_S
MIN_ATTEMPT_S = 1  # the first attempt is made even in a shorter window; later ones need this much left
TRANSIENT_CODES = ("SlowDown", "RequestTimeout", "Throttling")


class S3Store:
    """Reads and writes whole objects; transient faults are retried for up to `retry_window_s`."""

    def __init__(self, block_name: str, retry_window_s: float) -> None:
        self.block_name = block_name
        self.retry_window_s = retry_window_s
        self._credentials: AwsCredentials | MinIOCredentials | None = None
        self._clients: dict[int, object] = {}  # by attempt timeout, whole seconds

    async def credentials(self) -> AwsCredentials | MinIOCredentials:
        """The `S3Bucket` block's credentials, else boto3's environment; loaded once."""
        # prefect-aws (boto3, aiobotocore) takes ~0.9 s to import: only jobs that touch S3 pay for it.
        from prefect_aws import AwsCredentials
        from prefect_aws.s3 import S3Bucket

        if self._credentials is None:
            try:
                bucket: S3Bucket = await S3Bucket.aload(self.block_name)
                self._credentials = bucket.credentials
            except ValueError:  # no such block: boto3's own environment variables apply
                self._credentials = AwsCredentials()
        return self._credentials

    async def client(self, attempt_s: int) -> Any:  # a boto3 S3 client: boto3 ships no types
        """An S3 client whose connect and read timeouts add up to at most `attempt_s`, with no retries of its own.

        The block's own client parameters (endpoint, botocore config) are kept; only the timeouts and the
        retries are ours.
        """
        if attempt_s not in self._clients:
            credentials = await self.credentials()
            scale = min(1.0, attempt_s / ATTEMPT_TIMEOUT_S)
            params = credentials.aws_client_parameters
            config = {**(params.config or {}), "connect_timeout": CONNECT_TIMEOUT_S * scale,
                      "read_timeout": READ_TIMEOUT_S * scale, "retries": {"total_max_attempts": 1}}
            bounded = credentials.model_copy(
                update={"aws_client_parameters": params.model_copy(update={"config": config})})
            self._clients[attempt_s] = await run_sync_in_worker_thread(bounded.get_s3_client)
        return self._clients[attempt_s]

    async def write(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        """Write one whole object, retrying transient faults for the window.

        Raises:
            ObjectNotFound: the bucket does not exist.
            StorageError: refused (credentials, access), or the store stayed unreachable for the window.

        Example:
            >>> await store.write("factory", "jobs/a/log.json", b"{}", "application/json")
        """
        await self._retrying(f"write s3://{bucket}/{key}", lambda client: client.upload_fileobj(
            BytesIO(data), bucket, key, ExtraArgs={"ContentType": content_type}))

    async def read(self, bucket: str, key: str) -> bytes:
        """Read one whole object, retrying transient faults for the window.

        Raises:
            ObjectNotFound: no such bucket or key.
            StorageError: refused, or the store stayed unreachable for the window.

        Example:
            >>> await store.read("factory", "inputs/brief.txt")
        """
        return await self._retrying(f"read s3://{bucket}/{key}",
                                    lambda client: client.get_object(Bucket=bucket, Key=key)["Body"].read())

    async def _retrying(self, what: str, call: Callable[[Any], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        deadline = time.monotonic() + self.retry_window_s
        delay = RETRY_FIRST_DELAY_S
        # No attempt starts unless its timeouts end inside the window (the first one gets at least MIN_ATTEMPT_S).
        attempt_s = max(MIN_ATTEMPT_S, _whole_seconds_left(deadline))
        while True:
            try:
                client = await self.client(attempt_s)
                return await run_sync_in_worker_thread(call, client)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in NOT_FOUND:
                    raise ObjectNotFound(f"cannot {what}: it does not exist ({code})") from exc
                if status < 500 and code not in TRANSIENT_CODES:
                    raise StorageError(f"cannot {what}: {code or status}. Check the bucket and credentials.") from exc
                error = exc
            except ParamValidationError as exc:  # botocore refused the request itself: retrying cannot help
                raise StorageError(f"cannot {what}: {exc}") from exc
            except BotoCoreError as exc:  # connection refused, timeouts, DNS: the store is unreachable
                error = exc
            attempt_s = _whole_seconds_left(deadline - delay)
            if attempt_s < MIN_ATTEMPT_S:
                raise StorageError(f"cannot {what}: the store stayed unreachable for {self.retry_window_s:.0f}s "
                                   f"({type(error).__name__})") from error
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)


def _whole_seconds_left(deadline: float) -> int:
    """Whole seconds until `deadline`, at most one attempt's full timeouts: clients are cached per value."""
    return min(int(ATTEMPT_TIMEOUT_S), math.floor(deadline - time.monotonic()))
