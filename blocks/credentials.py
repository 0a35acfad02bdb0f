"""Provider API keys: a Prefect Secret block wins, the SDK's own environment variable is the fallback.

Block names: `anthropic-api-key`, `openai-api-key` (create them with `python -m blocks.register`).
Keys stay `SecretStr` until the SDK client is built; they are never logged or returned. The key that signs
job callbacks follows the same rule: the Secret block `factory-callback-secret`, else `FACTORY_CALLBACK_SECRET`.
"""

from __future__ import annotations

import os
import time

from prefect.blocks.system import Secret
from pydantic import SecretStr

from factory.errors import ConfigurationError
from factory.providers import DRY_RUN_MODEL
from factory.settings import get_settings

SECRET_BLOCKS = {"anthropic": "anthropic-api-key", "openai": "openai-api-key", "openai-compatible": "openai-api-key",
                 "fal": "fal-api-key", "elevenlabs": "elevenlabs-api-key"}
ENV_KEYS = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY", "openai-compatible": "OPENAI_API_KEY",
            "fal": "FAL_KEY", "elevenlabs": "ELEVENLABS_API_KEY"}
CALLBACK_SECRET_BLOCK = "factory-callback-secret"
CALLBACK_SECRET_ENV = "FACTORY_CALLBACK_SECRET"

# Keys found, with when they were read: a job makes every call with one lookup per key and TTL, not one per call.
_cache: dict[str, tuple[SecretStr, float]] = {}
_clock = time.monotonic


async def api_key_for(provider: str) -> SecretStr | None:
    """The key for `provider` from its Secret block, else from the environment, else None.

    A key found is kept for `FACTORY_SECRET_TTL_S` (a rotated key reaches a long-running worker within it);
    one not found is looked up again next time.
    """
    if provider not in SECRET_BLOCKS:
        return None  # needs no key: dry-run, and GPU models (RunPod's key lives with the `runpod` worker)
    return await _cached(provider, SECRET_BLOCKS[provider], ENV_KEYS[provider])


async def callback_secret() -> SecretStr | None:
    """The key that signs job callbacks (`X-Factory-Signature`), or None: callbacks then go unsigned.

    Kept as the provider keys are.
    """
    return await _cached("callback", CALLBACK_SECRET_BLOCK, CALLBACK_SECRET_ENV)


async def _cached(name: str, block: str, variable: str) -> SecretStr | None:
    kept = _cache.get(name)
    if kept is not None and _clock() - kept[1] < get_settings().secret_ttl_s:
        return kept[0]
    key = await _from_block(block) or _from_env(variable)
    if key is None:
        _cache.pop(name, None)
    else:
        _cache[name] = (key, _clock())
    return key


async def _from_block(name: str) -> SecretStr | None:
    try:
        block: Secret[str] = await Secret.aload(name)
    except ValueError:  # no such block document
        return None
    value = block.get()
    return SecretStr(value) if isinstance(value, str) and value else None


def _from_env(variable: str) -> SecretStr | None:
    value = os.environ.get(variable)
    return SecretStr(value) if value else None


async def require_api_key(provider: str, field: str, keyless: str | None = None) -> None:
    """Fail before any money is spent when a provider that needs a key has none.

    Raises:
        ConfigurationError: naming the parameter whose model needs the key, and a model that needs none
            (`keyless`, default the dry-run model).
    """
    if provider not in SECRET_BLOCKS or provider == "openai-compatible":
        return  # keyless providers (see api_key_for); local OpenAI-compatible servers commonly take no key
    if await api_key_for(provider) is None:
        alternative = keyless or f"model '{DRY_RUN_MODEL}'"
        raise ConfigurationError(
            field,
            f"no API key for {provider}: set {ENV_KEYS[provider]} where the worker runs, create the Secret "
            f"block '{SECRET_BLOCKS[provider]}' (python -m blocks.register), or use {alternative}.",
        )
