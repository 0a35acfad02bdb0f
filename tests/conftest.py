"""Test session set-up: isolated Prefect home, a real Prefect server (test harness), the LLM emulator.

The default suite cannot reach a paid API: every SDK base URL points at the loopback emulator.
"""

from __future__ import annotations

import os
import tempfile
from decimal import Decimal
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="factory-tests-"))
os.environ.update({
    "PREFECT_HOME": str(_SESSION_DIR / "prefect-home"),
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "FACTORY_STORAGE_ROOT": str(_SESSION_DIR / "storage"),
    "FACTORY_RETRY_DELAY_S": "0.05",
    "FACTORY_RETRIES": "6",
    # Media APIs answer only where a test starts their emulator (the media_api fixture): never the real hosts.
    "FACTORY_FAL_URL": "http://127.0.0.1:9", "FACTORY_FAL_QUEUE_URL": "http://127.0.0.1:9",
    "FACTORY_ELEVENLABS_URL": "http://127.0.0.1:9",
})
for _leak in ("ANTHROPIC_AUTH_TOKEN", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
    os.environ.pop(_leak, None)

import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from blocks import credentials  # noqa: E402
from factory.pricing import price_table  # noqa: E402
from factory.settings import get_settings  # noqa: E402
from factory.storage import get_storage  # noqa: E402
from tests.emulators.llm import API_KEY, OPENAI_KEY, Emulator  # noqa: E402
from tests.emulators.media import serve as serve_media  # noqa: E402
from tests.emulators.server import ThreadedServer  # noqa: E402
from tests.s3server import BUCKET, CREDENTIALS, S3Server  # noqa: E402


@pytest.fixture(scope="session")
def llm_server():
    emulator = Emulator()
    server = ThreadedServer(emulator.app).start()
    os.environ.update({
        "ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": API_KEY,
        "OPENAI_BASE_URL": f"{server.url}/v1", "OPENAI_API_KEY": OPENAI_KEY,
    })
    yield emulator
    server.stop()


@pytest.fixture
def llm(llm_server):
    """The emulator, reset to its default script for this test."""
    llm_server.reset()
    yield llm_server


@pytest.fixture
def media_api(monkeypatch):
    """The fal and ElevenLabs emulator (one server per session), reset, with FACTORY_FAL_URL & co. and the keys
    pointing at it for this test."""
    emulator = serve_media()
    emulator.reset()
    for name, value in emulator.environ().items():
        monkeypatch.setenv(name, value)
    reset_settings()
    yield emulator
    reset_settings()


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL_S3": server.url, "FACTORY_S3_BUCKET": BUCKET})
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=60):
        yield


def reset_settings() -> None:
    """Forget what a process reads once: settings, storage, provider keys (a test may have changed them)."""
    get_settings.cache_clear()
    get_storage.cache_clear()
    credentials._cache.clear()


@pytest.fixture
def factory_env(llm, prefect_server):
    reset_settings()
    yield llm
    reset_settings()


def billed_cost(emulator: Emulator) -> Decimal:
    """What the emulated provider billed for every successful call, at the Factory's price table."""
    table = price_table(get_settings())
    return sum(
        (Decimal(b.input_tokens) * table[b.model].input + Decimal(b.output_tokens) * table[b.model].output
         + Decimal(b.cache_read_tokens) * table[b.model].cache_read
         + Decimal(b.cache_write_tokens) * (table[b.model].cache_write_5m or table[b.model].input)) / Decimal(1_000_000)
        for b in emulator.billed
    ) or Decimal(0)


@pytest.fixture
def storage_root() -> Path:
    return get_storage().root


# Fixtures that start a server or a Prefect run (directly or through the fixtures they use).
SERVER_FIXTURES = frozenset({"prefect_server", "llm_server", "s3_server", "media_api", "deployment", "served"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the `fast` marker true: a test marked fast may not start a server."""
    for item in items:
        if item.get_closest_marker("fast") is None:
            continue
        used = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used:
            raise pytest.UsageError(f"{item.nodeid} is marked fast but uses {', '.join(sorted(used))}")
