"""Create the blocks a Factory deployment uses, from the environment it already has.

    python -m blocks.register            # against PREFECT_API_URL

Each provider key present in the environment (`ANTHROPIC_API_KEY`, `OPENAI_API_KEY`) is saved
as a Prefect Secret block (`anthropic-api-key`, `openai-api-key`), overwriting an older one, so
workers without the variable (and the UI) use the same key. Values are never printed.
"""

from __future__ import annotations

import asyncio
import os

from prefect.blocks.system import Secret

from blocks.credentials import ENV_KEYS, SECRET_BLOCKS


async def register() -> list[str]:
    """Save a Secret block per provider key found in the environment; returns the block names."""
    saved = []
    for provider, block_name in SECRET_BLOCKS.items():
        value = os.environ.get(ENV_KEYS[provider])
        if value and block_name not in saved:
            await Secret(value=value).save(block_name, overwrite=True)
            saved.append(block_name)
    return saved


def main() -> None:
    saved = asyncio.run(register())
    print("saved Secret blocks: " + (", ".join(saved) if saved else "none (no provider key in the environment)"))


if __name__ == "__main__":
    main()
