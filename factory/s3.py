"""Objects in S3 or any S3-compatible store, through prefect-aws.

Credentials and endpoint come from the `S3Bucket` block named by `FACTORY_S3_BLOCK` (default
`factory-s3`, created by `python -m blocks.register`); without it, from the environment boto3
reads (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL_S3`). boto3
is blocking, so every call runs in a worker thread, as prefect-aws does.
"""

from __future__ import annotations

import asyncio
import time
from io import BytesIO
from typing import TYPE_CHECKING

from prefect.utilities.asyncutils import run_sync_in_worker_thread

from factory.errors import ObjectNotFound, StorageError

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials

NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
RETRY_FIRST_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 2.0


class S3Store:
    """Reads and writes whole objects; transient faults are retried for up to `retry_window_s`."""

    def __init__(self, block_name: str, retry_window_s: float) -> None:
        self.block_name = block_name
        self.retry_window_s = retry_window_s
        self._credentials: AwsCredentials | None = None

    async def credentials(self) -> AwsCredentials:
        # prefect-aws (boto3, aiobotocore) takes ~0.9 s to import: only jobs that touch S3 pay for it.
        from prefect_aws import AwsCredentials
        from prefect_aws.s3 import S3Bucket

        if self._credentials is None:
            try:
                self._credentials = (await S3Bucket.aload(self.block_name)).credentials
            except ValueError:  # no such block: boto3's own environment variables apply
                self._credentials = AwsCredentials()
        return self._credentials

    async def write(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        client = (await self.credentials()).get_s3_client()
        await self._retrying(f"write s3://{bucket}/{key}", lambda: client.upload_fileobj(
            BytesIO(data), bucket, key, ExtraArgs={"ContentType": content_type}))

    async def read(self, bucket: str, key: str) -> bytes:
        client = (await self.credentials()).get_s3_client()

        def _get() -> bytes:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()

        return await self._retrying(f"read s3://{bucket}/{key}", _get)

    async def _retrying(self, what: str, call):
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.retry_window_s
        delay = RETRY_FIRST_DELAY_S
        while True:
            try:
                return await run_sync_in_worker_thread(call)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in NOT_FOUND:
                    raise ObjectNotFound(f"cannot {what}: it does not exist ({code})") from exc
                if status < 500 and code not in ("SlowDown", "RequestTimeout", "Throttling"):
                    raise StorageError(f"cannot {what}: {code or status}. Check the bucket and credentials.") from exc
                error = exc
            except BotoCoreError as exc:  # connection refused, timeouts, DNS: the store is unreachable
                error = exc
            if time.monotonic() + delay > deadline:
                raise StorageError(f"cannot {what}: the store stayed unreachable for {self.retry_window_s:.0f}s "
                                   f"({type(error).__name__})") from error
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
