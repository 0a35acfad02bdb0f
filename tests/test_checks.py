"""Deterministic checks and the sandbox: definitions refused up front, evaluation bounded, secrets kept in.

Every socket here is loopback: the servers are started by the tests, and nothing may reach them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from factory import checks, sandbox
from factory.checks import (
    CheckResult,
    Checks,
    CodeChecksNotAllowed,
    JsonSchemaCheck,
    LengthCheck,
    PythonCheck,
    RegexCheck,
    code_checks_problem,
    run_checks,
)
from factory.errors import ConfigurationError
from tests.emulators.server import ThreadedServer

pytestmark = pytest.mark.fast

ADAPTER: TypeAdapter[list[Any]] = TypeAdapter(Checks)
SECRET = "sk-ant-secret-test"
ADD = "def add(a, b):\n    return a + b\n"
TEST_ADD = "from solution import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def parse(*definitions: dict[str, Any]) -> list[Any]:
    return ADAPTER.validate_python(list(definitions))


async def run_one(definition: dict[str, Any], artifact: str) -> CheckResult:
    [result] = await run_checks(parse(definition), artifact, allow_code=True)
    return result


# --- servers that must receive nothing ---

class Recorder:
    """An ASGI app that notes every request and answers with a schema (what a fetched $ref would get)."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests.append(scope["path"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/schema+json")]})
        await send({"type": "http.response.body", "body": b'{"type": "string"}'})


@pytest.fixture
def http_recorder() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = ThreadedServer(recorder).start()
    yield server.url, recorder
    server.stop()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A bare loopback TCP listener: a completed connection would wait in its backlog."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def connections(sock: socket.socket) -> int:
    sock.settimeout(0.3)
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            return count
        conn.close()
        count += 1


# --- definitions ---

VALID = {"type": "length", "unit": "chars", "max": 10}


@pytest.mark.parametrize(("bad", "loc", "says"), [
    ({"type": "regex", "pattern": "(unclosed"}, (2, "regex", "pattern"), "does not compile"),
    ({"type": "regex", "pattern": ""}, (2, "regex", "pattern"), "at least 1"),
    ({"type": "regex", "pattern": "a" * 1001}, (2, "regex", "pattern"), "at most 1000"),
    ({"type": "regex", "pattern": "a", "expect": "maybe"}, (2, "regex", "expect"), "match"),
    ({"type": "length", "unit": "words", "min": 10, "max": 5}, (2, "length", "max"), "min (10) is greater"),
    ({"type": "length", "unit": "words"}, (2, "length", "max"), "`min`, `max` or both"),
    ({"type": "length", "unit": "words", "min": -1}, (2, "length", "min"), "greater than or equal to 0"),
    ({"type": "length", "unit": "words", "max": 10_000_001}, (2, "length", "max"), "less than or equal"),
    ({"type": "length", "unit": "pages", "max": 3}, (2, "length", "unit"), "chars"),
    ({"type": "json_schema", "schema": {"type": "nonsense"}}, (2, "json_schema", "schema"), "Draft 2020-12"),
    ({"type": "json_schema", "schema": {"minLength": -1}}, (2, "json_schema", "schema"), "/minLength"),
    ({"type": "json_schema", "schema": {"enum": ["x" * 100_000]}}, (2, "json_schema", "schema"), "at most 100000"),
    ({"type": "json_schema", "schema": {"$ref": "https://example.com/s.json"}}, (2, "json_schema", "schema"),
     "refers outside itself"),
    ({"type": "python", "tests": "def test(): pass", "timeout_s": 0}, (2, "python", "timeout_s"), "greater"),
    ({"type": "python", "tests": "def test(): pass", "timeout_s": 301}, (2, "python", "timeout_s"), "less"),
    ({"type": "python", "tests": ""}, (2, "python", "tests"), "at least 1"),
    ({"type": "shell", "command": "rm -rf /"}, (2,), "does not match any of the expected tags"),
    ({"pattern": "a"}, (2,), "Unable to extract tag"),
    ({"type": "regex", "pattern": "a", "flags": "i"}, (2, "regex", "flags"), "Extra inputs"),
])
def test_bad_definitions_are_refused_naming_the_field(bad: dict[str, Any], loc: tuple[Any, ...], says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(VALID, VALID, bad)
    [error] = caught.value.errors()
    assert error["loc"] == loc
    assert says in error["msg"]


def test_at_most_20_checks() -> None:
    assert len(parse(*[VALID] * 20)) == 20
    with pytest.raises(ValidationError) as caught:
        parse(*[VALID] * 21)
    [error] = caught.value.errors()
    assert error["type"] == "too_long" and error["loc"] == ()


def test_the_schema_field_is_spelled_schema_everywhere() -> None:
    [check] = parse({"type": "json_schema", "schema": {"type": "object"}})
    assert check.model_dump(by_alias=True) == {"type": "json_schema", "schema": {"type": "object"}}
    assert ADAPTER.dump_python([check], by_alias=True) == [{"type": "json_schema", "schema": {"type": "object"}}]
    assert JsonSchemaCheck(type="json_schema", schema_={"type": "object"}) == check  # by name too
    props = ADAPTER.json_schema()["$defs"]["JsonSchemaCheck"]["properties"]
    assert "schema" in props and "schema_" not in props
    assert ADAPTER.json_schema()["maxItems"] == 20


def test_checks_are_frozen() -> None:
    [check] = parse({"type": "regex", "pattern": "a"})
    with pytest.raises(ValidationError):
        check.pattern = "b"


# --- evaluation ---

async def test_regex_match_and_no_match() -> None:
    assert (await run_one({"type": "regex", "pattern": r"\bfox\b"}, "the quick fox")).passed
    missing = await run_one({"type": "regex", "pattern": r"\bdog\b"}, "the quick fox")
    assert not missing.passed and "no match" in missing.detail
    assert (await run_one({"type": "regex", "pattern": "TODO", "expect": "no_match"}, "done")).passed
    found = await run_one({"type": "regex", "pattern": "TODO", "expect": "no_match"}, "x TODO y")
    assert not found.passed and "offset 2" in found.detail and "must not match" in found.detail


async def test_a_catastrophic_regex_fails_fast_and_never_blocks_the_loop() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    try:
        nested = await run_one({"type": "regex", "pattern": "(a+)+$"}, "a" * 40 + "b")
        exponential = await run_one({"type": "regex", "pattern": "(a|aa)+$"}, "a" * 40 + "b")
    finally:
        ticker.cancel()
    assert time.monotonic() - started < 5
    assert not nested.passed and not exponential.passed
    assert f"longer than {checks.REGEX_TIMEOUT_S:g} s" in exponential.detail
    assert ticks >= 10  # the loop ran while the regex was searched in its thread


@pytest.mark.parametrize(("unit", "text", "size"), [
    ("chars", "héllo", 5), ("words", " one  two\tthree\nfour ", 4), ("lines", "a\nb\r\nc", 3),
])
async def test_length_units(unit: str, text: str, size: int) -> None:
    assert LengthCheck(type="length", unit=unit, min=size, max=size).measure(text) == size  # type: ignore[arg-type]
    assert (await run_one({"type": "length", "unit": unit, "min": size}, text)).passed
    over = await run_one({"type": "length", "unit": unit, "max": size - 1}, text)
    assert not over.passed and over.detail == f"{size} {unit}; expected at most {size - 1}"


async def test_length_detail_names_the_range() -> None:
    result = await run_one({"type": "length", "unit": "words", "min": 60, "max": 100}, "word " * 66)
    assert result.passed and result.detail == "66 words; expected 60..100"


PERSON = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"$ref": "#/$defs/age"}},
          "$defs": {"age": {"type": "integer", "minimum": 0}}}


async def test_json_schema_passes_and_fails_with_paths() -> None:
    check = {"type": "json_schema", "schema": PERSON}
    assert (await run_one(check, '{"name": "Ada", "age": 36}')).passed
    bad = await run_one(check, '{"name": 7, "age": -1}')
    assert not bad.passed
    assert "$.name: 7 is not of type 'string'" in bad.detail and "$.age: -1 is less than the minimum" in bad.detail


async def test_json_schema_reads_one_fenced_block() -> None:
    check = {"type": "json_schema", "schema": PERSON}
    fenced = 'Here it is:\n```json\n{"name": "Ada", "age": 36}\n```\nDone.'
    assert (await run_one(check, fenced)).passed
    assert (await run_one(check, 'Plain:\n```\n{"name": "Ada", "age": 36}\n```')).passed
    two = await run_one(check, fenced + "\n```json\n{}\n```")
    assert not two.passed and "2 ```json blocks" in two.detail
    prose = await run_one(check, "no JSON here")
    assert not prose.passed and "not JSON" in prose.detail
    broken = await run_one(check, "```json\n{oops}\n```")
    assert not broken.passed and "not valid JSON" in broken.detail


@pytest.mark.parametrize("ref", [
    "{url}/schema.json", "{url}/schema.json#/$defs/x", "file:///etc/passwd", "other.json", "urn:example:nowhere",
])
def test_a_foreign_ref_is_refused_and_never_fetched(http_recorder: tuple[str, Recorder], ref: str) -> None:
    url, recorder = http_recorder
    schema = {"type": "object", "properties": {"a": {"$ref": ref.format(url=url)}}}
    with pytest.raises(ValidationError) as caught:
        parse({"type": "json_schema", "schema": schema})
    [error] = caught.value.errors()
    assert error["loc"] == (0, "json_schema", "schema") and "/properties/a/$ref" in error["msg"]
    time.sleep(0.2)
    assert recorder.requests == []


def test_refs_defined_inside_the_schema_are_accepted() -> None:
    schema = {"$id": "https://example.com/root.json", "$ref": "item.json",
              "$defs": {"item": {"$id": "item.json", "type": "string", "$anchor": "it"}},
              "properties": {"$ref": {"type": "string"}, "x": {"$ref": "#it"}}, "enum": [{"$ref": "http://data"}]}
    assert parse({"type": "json_schema", "schema": schema})


async def test_evaluation_never_fetches_even_past_validation(http_recorder: tuple[str, Recorder]) -> None:
    url, recorder = http_recorder
    # A $schema is not a reference: accepted, and not fetched either.
    dialect = await run_one({"type": "json_schema", "schema": {"$schema": f"{url}/meta", "type": "string"}}, '"x"')
    assert dialect.passed
    # Built without validation, as a bug upstream might: the child's registry refuses to retrieve.
    smuggled = JsonSchemaCheck.model_construct(type="json_schema", schema_={"$ref": f"{url}/remote.json"})
    [result] = await run_checks([smuggled], '"x"', allow_code=False)
    assert not result.passed and "could not be applied" in result.detail
    time.sleep(0.2)
    assert recorder.requests == []


@pytest.mark.parametrize(("schema", "instance"), [
    ({"$defs": {**{f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
                   for i in range(40)}, "d40": {"type": "string"}}, "$ref": "#/$defs/d0"}, "1"),
    ({"type": "string", "pattern": "(a|aa)+$"}, json.dumps("a" * 60 + "b")),
])
async def test_an_exponential_schema_is_stopped(monkeypatch: pytest.MonkeyPatch, schema: dict[str, Any],
                                                instance: str) -> None:
    monkeypatch.setattr(checks, "JSON_SCHEMA_TIMEOUT_S", 2.0)
    started = time.monotonic()
    result = await run_one({"type": "json_schema", "schema": schema}, instance)
    assert time.monotonic() - started < 8
    assert not result.passed and "longer than 2 s" in result.detail


def test_too_deep_a_schema_is_refused() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(120):
        schema = {"items": schema}
    with pytest.raises(ValidationError, match="nests deeper"):
        parse({"type": "json_schema", "schema": schema})


def test_python_source_is_the_one_fenced_block() -> None:
    assert checks.python_source("x = 1\n") == ("x = 1\n", None)
    assert checks.python_source("Here:\n```python\nx = 1\n```\nThat's it.") == ("x = 1", None)
    assert checks.python_source("```py\n    x = 1\n```\n```json\n{}\n```") == ("x = 1", None)
    source, problem = checks.python_source("```python\na = 1\n```\n```\nb = 2\n```")
    assert source == "" and problem is not None and "2 ```python blocks" in problem
    assert checks.python_source("```python\nunclosed") == ("```python\nunclosed", None)


def test_details_are_trimmed() -> None:
    detail = CheckResult(type="x", passed=False, detail="start " + "y" * 10_000 + " end").detail
    assert len(detail) <= checks.MAX_DETAIL_CHARS
    assert detail.startswith("start ") and detail.endswith(" end")


# --- python checks and the sandbox ---

async def test_python_checks_need_the_worker_to_allow_code() -> None:
    defs = parse(VALID, VALID, {"type": "python", "tests": TEST_ADD})
    problem = code_checks_problem(defs, allow_code=False)
    assert problem == ("checks[2]: a python check runs model-written code; the worker allows it only with "
                       "FACTORY_ALLOW_CODE_CHECKS=true")
    assert code_checks_problem(defs, allow_code=True) is None
    assert code_checks_problem(defs[:2], allow_code=False) is None
    with pytest.raises(CodeChecksNotAllowed) as caught:
        await run_checks(defs, ADD, allow_code=False)
    assert isinstance(caught.value, ConfigurationError) and caught.value.field == "checks"
    assert "checks[2]" in str(caught.value) and "FACTORY_ALLOW_CODE_CHECKS" in str(caught.value)


async def test_python_check_passes_and_fails() -> None:
    passing = await run_one({"type": "python", "tests": TEST_ADD}, f"Here:\n```python\n{ADD}```\n")
    assert passing.passed and "the tests passed" in passing.detail
    failing = await run_one({"type": "python", "tests": TEST_ADD}, ADD.replace("+", "-"))
    assert not failing.passed and "assert -1 == 5" in failing.detail


@pytest.fixture(params=["probed", "limits"])
def level(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The isolation this process really gets, and the weakest fallback, forced."""
    if request.param == "limits":
        monkeypatch.setattr(sandbox, "_isolation", sandbox.Isolation(level="limits", reason="forced by the test"))
    return str(request.param)


async def test_sandbox_pass_and_fail(level: str) -> None:
    ok = await sandbox.run_pytest(ADD, TEST_ADD, 30)
    assert ok.passed and ok.exit_code == 0 and not ok.timed_out and "1 passed" in ok.output
    bad = await sandbox.run_pytest(ADD.replace("+", "*"), TEST_ADD, 30)
    assert not bad.passed and bad.exit_code == 1 and "assert 6 == 5" in bad.output
    if level == "limits":
        assert bad.isolation == "limits" and not bad.isolated


async def test_the_probed_level_is_reported() -> None:
    isolation = await sandbox.isolation()
    outcome = await sandbox.run_pytest(ADD, TEST_ADD, 30)
    assert outcome.isolation == isolation.level and outcome.isolated == (isolation.level == "namespaces")
    if hasattr(os, "geteuid") and os.geteuid() == 0 and os.uname().sysname == "Linux":
        print(f"sandbox isolation here: {isolation}")


async def test_the_sandbox_gets_no_secret(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "RUNPOD_API_KEY",
                 "PREFECT_API_KEY", "FACTORY_S3_BLOCK"):
        monkeypatch.setenv(name, SECRET)
    tests = ("import os, solution\n\ndef test_env():\n"
             "    print('ENV', dict(os.environ))\n    assert False, dict(os.environ)\n")
    outcome = await sandbox.run_pytest("", tests, 30)
    assert "PYTEST_DISABLE_PLUGIN_AUTOLOAD" in outcome.output  # the environment really was printed
    assert SECRET not in outcome.output


async def test_the_sandbox_cannot_write_outside_its_directory(tmp_path: Path) -> None:
    shared = Path("/tmp") / f"factory-checks-{uuid.uuid4().hex}"
    shared.mkdir()
    shared.chmod(0o777)
    try:
        targets = [shared / "escaped", tmp_path / "escaped"]
        tests = ("def test_write():\n"
                 f"    for path in {[str(t) for t in targets]!r}:\n"
                 "        try:\n            open(path, 'w').write('x')\n"
                 "        except OSError as exc:\n            print('refused', path, exc)\n")
        outcome = await sandbox.run_pytest("", tests, 30)
        if not outcome.isolated:
            pytest.skip(f"the sandbox is not isolated here ({(await sandbox.isolation()).reason})")
        assert outcome.passed, outcome.output
        assert [t for t in targets if t.exists()] == []
    finally:
        for path in shared.iterdir():
            path.unlink()
        shared.rmdir()


async def test_the_sandbox_has_no_network_and_sees_no_worker(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    tests = ("import os, socket\n\ndef test_net():\n"
             "    print('PIDS', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
             f"    socket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n")
    outcome = await sandbox.run_pytest("", tests, 30)
    if not outcome.isolated:
        pytest.skip(f"the sandbox is not isolated here ({(await sandbox.isolation()).reason})")
    assert not outcome.passed and "Network is unreachable" in outcome.output
    assert connections(listener) == 0
    assert str(os.getpid()) not in outcome.output.split("PIDS", 1)[1].split("\n", 1)[0]


def _process_exists(marker: str) -> bool:
    for entry in Path("/proc").iterdir():
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


async def test_the_sandbox_is_killed_at_its_timeout(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[int] = []
    spawn = asyncio.create_subprocess_exec

    async def recording(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await spawn(*args, **kwargs)
        groups.append(proc.pid)  # start_new_session: its pid is its process group's id
        return proc

    monkeypatch.setattr(sandbox.asyncio, "create_subprocess_exec", recording)
    isolated = (await sandbox.isolation()).level == "namespaces"
    marker = f"{uuid.uuid4().int % 10**6}.5"
    # Isolated, a process that left the group (setsid) dies with the namespace; elsewhere it would survive.
    escape = f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n    " if isolated else ""
    tests = f"import subprocess\n\ndef test_forever():\n    {escape}while True:\n        pass\n"
    started = time.monotonic()
    outcome = await sandbox.run_pytest("", tests, 2)
    assert time.monotonic() - started < 10
    assert outcome.timed_out and not outcome.passed and outcome.exit_code is None
    assert groups
    for pgid in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, signal.SIGCONT)
    if isolated:
        assert not _process_exists(marker)


async def test_the_sandbox_directory_is_removed(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    mkdtemp = sandbox.tempfile.mkdtemp

    def recording(*args: Any, **kwargs: Any) -> str:
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording)
    seen = await sandbox.run_pytest("", "import os\n\ndef test_cwd():\n    print('CWD', os.getcwd())\n"
                                        "    assert False\n", 30)
    cwd = seen.output.split("CWD ", 1)[1].split("\n", 1)[0].strip()
    assert cwd == (sandbox.INSIDE_DIR if seen.isolated else str(Path(made[-1]) / "work"))
    assert made and not any(Path(path).exists() for path in made)


async def test_python_check_detail_keeps_the_summary() -> None:
    tests = "def test_noisy():\n    print('x' * 20000)\n    assert 1 == 2\n"
    [result] = await run_checks([PythonCheck(type="python", tests=tests)], "", allow_code=True)
    assert not result.passed and len(result.detail) <= checks.MAX_DETAIL_CHARS
    assert "the tests failed" in result.detail and "assert 1 == 2" in result.detail


def test_regex_check_model_directly() -> None:
    assert RegexCheck(type="regex", pattern="a+").expect == "match"


async def test_the_sandbox_is_isolated_wherever_the_platform_allows_it():
    """Root on Linux with a working `unshare` (this machine, CI, the worker image) must get the namespaces, so the
    isolation tests above run rather than skip: a checkout or venv under /tmp once fell back to limits only."""
    import shutil
    import subprocess
    import sys

    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("namespaces need root on Linux")
    if subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("this kernel or container refuses new namespaces")
    found = await sandbox.isolation()
    assert found.level == "namespaces", found.reason
