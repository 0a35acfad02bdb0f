"""Create the blocks a Factory deployment uses, from the environment it already has.

    python -m blocks.register            # against PREFECT_API_URL

Saved (overwriting older ones), values never printed:
- each provider key present (`ANTHROPIC_API_KEY`, `OPENAI_API_KEY`, `FAL_KEY`, `ELEVENLABS_API_KEY`,
  `RUNPOD_API_KEY`) as a Secret block (`anthropic-api-key`, `openai-api-key`, `fal-api-key`,
  `elevenlabs-api-key`, `runpod-api-key`);
- `FACTORY_CALLBACK_SECRET`, the key that signs job callbacks, as the Secret block `factory-callback-secret`;
- with `FACTORY_S3_BUCKET` set: an `AwsCredentials` block `factory-aws` from `AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` and `AWS_ENDPOINT_URL_S3` (any S3-compatible store), an
  `S3Bucket` block `factory-s3` for `s3://` refs, and an `S3Bucket` block `factory-results`
  (folder `prefect-results/`) for flow and task results: point Prefect at it with
  `prefect config set PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/factory-results`.
"""

from __future__ import annotations

import asyncio
import os

from prefect.blocks.system import Secret
from prefect_aws import AwsClientParameters, AwsCredentials
from prefect_aws.s3 import S3Bucket

from blocks.credentials import CALLBACK_SECRET_BLOCK, CALLBACK_SECRET_ENV, ENV_KEYS, SECRET_BLOCKS
from factory.settings import get_settings

AWS_BLOCK = "factory-aws"
RESULTS_BLOCK = "factory-results"
RESULTS_FOLDER = "prefect-results"
RUNPOD_BLOCK = "runpod-api-key"  # for the `runpod` pool's api_key: {{ prefect.blocks.secret.runpod-api-key }}


async def register() -> list[str]:
    """Save the blocks the environment has values for; returns their names."""
    saved = []
    for provider, block_name in SECRET_BLOCKS.items():
        value = os.environ.get(ENV_KEYS[provider])
        if value and block_name not in saved:
            await Secret(value=value).save(block_name, overwrite=True)
            saved.append(block_name)
    if runpod_key := os.environ.get("RUNPOD_API_KEY"):
        await Secret(value=runpod_key).save(RUNPOD_BLOCK, overwrite=True)
        saved.append(RUNPOD_BLOCK)
    if callback_key := os.environ.get(CALLBACK_SECRET_ENV):
        await Secret(value=callback_key).save(CALLBACK_SECRET_BLOCK, overwrite=True)
        saved.append(CALLBACK_SECRET_BLOCK)
    bucket = os.environ.get("FACTORY_S3_BUCKET")
    if bucket:
        credentials = AwsCredentials(
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            aws_client_parameters=AwsClientParameters(endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3")),
        )
        await credentials.save(AWS_BLOCK, overwrite=True)
        await S3Bucket(bucket_name=bucket, credentials=credentials).save(get_settings().s3_block, overwrite=True)
        await S3Bucket(bucket_name=bucket, credentials=credentials, bucket_folder=RESULTS_FOLDER).save(
            RESULTS_BLOCK, overwrite=True)
        saved += [AWS_BLOCK, get_settings().s3_block, RESULTS_BLOCK]
    return saved


def main() -> None:
    saved = asyncio.run(register())
    print("saved blocks: " + (", ".join(saved) if saved else "none (no provider key or FACTORY_S3_BUCKET set)"))


if __name__ == "__main__":
    main()
