"""Deterministic checks a job can ask for: regex, length, JSON Schema and Python tests, run on each artifact.

Definitions arrive as a flow parameter anyone with API access can set, so they are refused up front
(with the field named) when they cannot work, and evaluation is bounded: a regex has a timeout, a JSON
Schema never fetches a `$ref` and is applied in a killable child process, Python tests run in the sandbox
(factory/sandbox.py) and only where the worker allows model-written code to run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import Sequence
from typing import Annotated, Any, Literal
from urllib.parse import urldefrag, urljoin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from factory import sandbox
from factory.errors import ConfigurationError

MAX_CHECKS = 20
MAX_PATTERN_CHARS = 1000
REGEX_TIMEOUT_S = 1.0
MAX_LENGTH_BOUND = 10_000_000
MAX_SCHEMA_CHARS = 100_000
MAX_SCHEMA_DEPTH = 100  # nested objects and arrays; deeper would only exhaust the validator's recursion
MAX_SCHEMA_ERRORS = 5  # reported per failed json_schema check
MAX_SCHEMA_ERROR_CHARS = 200
JSON_SCHEMA_TIMEOUT_S = 10.0  # nested anyOf/$ref or a `pattern` can make validation exponential
MAX_TESTS_CHARS = 100_000
DEFAULT_PYTHON_TIMEOUT_S = 30
MAX_PYTHON_TIMEOUT_S = 300
MAX_DETAIL_CHARS = 2000
ALLOW_CODE_SETTING = "FACTORY_ALLOW_CODE_CHECKS"
JSON_FENCES = frozenset({"json", ""})
PYTHON_FENCES = frozenset({"python", "py", "python3", ""})
# Keywords whose values are data, not subschemas: a `$ref` key inside them is not a reference.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})

# Runs in a child (python -I): validates an instance, read from stdin with its schema, and prints the first
# errors. A child because a hostile schema can make validation run for hours, and a thread cannot be stopped.
_SCHEMA_VALIDATOR = """\
import json, sys
from jsonschema import Draft202012Validator
from referencing import Registry
request = json.load(sys.stdin)
try:
    # A registry without a retrieve function: a $ref the schema does not define fails, it is never fetched.
    validator = Draft202012Validator(request["schema"], registry=Registry())
    errors = []
    for error in validator.iter_errors(json.loads(request["instance"])):
        errors.append(error.json_path + ": " + error.message[:request["chars"]])
        if len(errors) == request["limit"]:
            break
    json.dump({"errors": errors}, sys.stdout)
except Exception as exc:
    json.dump({"failure": type(exc).__name__ + ": " + str(exc)[:500]}, sys.stdout)
"""


class CodeChecksNotAllowed(ConfigurationError):
    """A job has a `python` check, which runs model-written code, and the worker does not allow that."""

    def __init__(self, problem: str) -> None:
        super().__init__("checks", problem)


class CheckResult(BaseModel):
    """One check's verdict on one artifact; `detail` is shown to the executor as feedback."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    passed: bool
    detail: str

    @field_validator("detail")
    @classmethod
    def _trim(cls, detail: str) -> str:
        return trim(detail, MAX_DETAIL_CHARS)


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegexCheck(_Check):
    """The artifact must (or must not) contain a match of `pattern` (the `regex` module's syntax)."""

    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS)
    expect: Literal["match", "no_match"] = "match"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        import regex  # type: ignore[import-untyped]  # only jobs with checks pay its import

        try:
            regex.compile(pattern)
        except regex.error as exc:
            raise ValueError(f"the pattern does not compile: {exc}") from exc
        return pattern

    async def run(self, artifact: str) -> CheckResult:
        """Search the artifact in a thread (the event loop stays free), for REGEX_TIMEOUT_S at most."""
        import regex

        try:
            found = await asyncio.to_thread(regex.search, self.pattern, artifact, timeout=REGEX_TIMEOUT_S,
                                            concurrent=True)
        except TimeoutError:
            return CheckResult(type=self.type, passed=False, detail=(
                f"the pattern took longer than {REGEX_TIMEOUT_S:g} s on the artifact and was stopped; "
                "it backtracks catastrophically: simplify it"))
        if found is None:
            return CheckResult(type=self.type, passed=self.expect == "no_match",
                               detail=f"no match for {self.pattern!r}")
        where = f"{self.pattern!r} matched {trim(found.group(0), 100)!r} at offset {found.start()}"
        if self.expect == "match":
            return CheckResult(type=self.type, passed=True, detail=where)
        return CheckResult(type=self.type, passed=False, detail=f"{where}; the artifact must not match it")


class LengthCheck(_Check):
    """The artifact's length in characters, words (whitespace-separated) or lines lies within min..max."""

    type: Literal["length"]
    unit: Literal["chars", "words", "lines"]
    min: int | None = Field(default=None, ge=0)
    # validate_default: the rule "min, max or both" is checked here even when max is left out.
    max: int | None = Field(default=None, ge=0, le=MAX_LENGTH_BOUND, validate_default=True)

    @field_validator("max")
    @classmethod
    def _bounds(cls, maximum: int | None, info: ValidationInfo) -> int | None:
        if "min" not in info.data:  # min itself was refused; its own error says why
            return maximum
        minimum = info.data["min"]
        if minimum is None and maximum is None:
            raise ValueError("a length check needs `min`, `max` or both")
        if minimum is not None and maximum is not None and minimum > maximum:
            raise ValueError(f"min ({minimum}) is greater than max ({maximum})")
        return maximum

    def measure(self, text: str) -> int:
        """The artifact's length in `unit`."""
        if self.unit == "words":
            return len(text.split())
        if self.unit == "lines":
            return len(text.splitlines())
        return len(text)

    async def run(self, artifact: str) -> CheckResult:
        """Compare the artifact's length with the bounds."""
        size = self.measure(artifact)
        low = self.min if self.min is not None else 0
        high = self.max if self.max is not None else float("inf")
        bounds = (f"{self.min}..{self.max}" if self.min is not None and self.max is not None
                  else f"at least {self.min}" if self.min is not None else f"at most {self.max}")
        return CheckResult(type=self.type, passed=low <= size <= high, detail=f"{size} {self.unit}; expected {bounds}")


class JsonSchemaCheck(_Check):
    """The artifact (or its one fenced ```json block) is JSON valid under `schema` (Draft 2020-12)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    type: Literal["json_schema"]
    # `schema` is a BaseModel attribute: the field is schema_, spelled `schema` in input, output and JSON Schema.
    schema_: dict[str, Any] = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"the schema is not plain JSON: {exc}") from exc
        if size > MAX_SCHEMA_CHARS:
            raise ValueError(f"the schema is {size} characters of JSON; at most {MAX_SCHEMA_CHARS} are allowed")
        from jsonschema import Draft202012Validator  # type: ignore[import-untyped]  # only jobs with checks
        from jsonschema.exceptions import SchemaError  # type: ignore[import-untyped]

        foreign = foreign_refs(schema)  # also refuses schemas nested deeper than MAX_SCHEMA_DEPTH
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            where = "".join(f"/{part}" for part in exc.path) or "the top level"
            raise ValueError(f"not a valid Draft 2020-12 JSON Schema at {where}: {exc.message}") from exc
        if foreign:
            raise ValueError(f"the schema refers outside itself ({'; '.join(foreign[:3])}); every `$ref` must "
                             "point into the schema (e.g. `#/$defs/name`): nothing is ever fetched")
        return schema

    async def run(self, artifact: str) -> CheckResult:
        """Find the JSON, then validate it in a bounded child process."""
        text, problem = await asyncio.to_thread(_json_text, artifact)
        if problem is not None:
            return CheckResult(type=self.type, passed=False, detail=problem)
        request = json.dumps({"schema": self.schema_, "instance": text, "limit": MAX_SCHEMA_ERRORS,
                              "chars": MAX_SCHEMA_ERROR_CHARS})
        run = await sandbox.run_bounded([sys.executable, "-I", "-c", _SCHEMA_VALIDATOR], stdin=request.encode(),
                                        timeout_s=JSON_SCHEMA_TIMEOUT_S)
        if run.timed_out:
            return CheckResult(type=self.type, passed=False, detail=(
                f"validating against the schema took longer than {JSON_SCHEMA_TIMEOUT_S:g} s and was stopped; "
                "simplify the schema (nested anyOf/oneOf, `pattern`)"))
        try:
            answer = json.loads(run.stdout)
        except ValueError:
            return CheckResult(type=self.type, passed=False,
                               detail=f"the schema validator failed (exit {run.exit_code}): {run.stderr.strip()}")
        if "failure" in answer:
            return CheckResult(type=self.type, passed=False, detail=f"the schema could not be applied: "
                                                                    f"{answer['failure']}")
        errors: list[str] = answer["errors"]
        if not errors:
            return CheckResult(type=self.type, passed=True, detail="the JSON is valid under the schema")
        more = " (and maybe more)" if len(errors) == MAX_SCHEMA_ERRORS else ""
        return CheckResult(type=self.type, passed=False,
                           detail=f"the JSON does not match the schema{more}: " + "; ".join(errors))


class PythonCheck(_Check):
    """pytest `tests` (which import `solution`) pass against the artifact (or its one fenced python block)."""

    type: Literal["python"]
    tests: str = Field(min_length=1, max_length=MAX_TESTS_CHARS)
    timeout_s: int = Field(default=DEFAULT_PYTHON_TIMEOUT_S, ge=1, le=MAX_PYTHON_TIMEOUT_S)

    async def run(self, artifact: str) -> CheckResult:
        """Run the tests in the sandbox; callers check `allow_code` first (run_checks does)."""
        solution, problem = python_source(artifact)
        if problem is not None:
            return CheckResult(type=self.type, passed=False, detail=problem)
        outcome = await sandbox.run_pytest(solution, self.tests, self.timeout_s)
        if outcome.timed_out:
            head = f"the tests took longer than {self.timeout_s} s and were killed"
        else:
            head = "the tests passed" if outcome.passed else f"the tests failed (pytest exit {outcome.exit_code})"
        where = "" if outcome.isolated else f" [sandbox level: {outcome.isolation}]"
        return CheckResult(type=self.type, passed=outcome.passed, detail=f"{head}{where}\n{outcome.output}")


Check = Annotated[RegexCheck | LengthCheck | JsonSchemaCheck | PythonCheck, Field(discriminator="type")]
Checks = Annotated[list[Check], Field(max_length=MAX_CHECKS)]


def all_passed(results: Sequence[CheckResult]) -> bool:
    """Whether every check passed (no checks: they all did)."""
    return all(r.passed for r in results)


def trim(text: str, limit: int) -> str:
    """`text` cut to `limit` characters by dropping its middle: the start and the end are what explain."""
    if len(text) <= limit:
        return text
    marker = "\n…\n"
    keep = limit - len(marker)
    return text[:keep // 2] + marker + text[len(text) - (keep - keep // 2):]


def fenced_blocks(text: str, languages: frozenset[str]) -> list[str]:
    """The contents of the closed ``` blocks whose language tag (lower-cased; "" for none) is in `languages`.

    Line by line rather than one regular expression, so the cost is linear whatever the artifact holds.
    """
    blocks: list[str] = []
    language: str | None = None  # inside a block: its tag
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if language is None:
            if stripped.startswith("```"):
                tag = stripped.lstrip("`").split(maxsplit=1)
                language, lines = (tag[0].lower() if tag else ""), []
        elif stripped.startswith("```") and not stripped.strip("`"):
            if language in languages:
                blocks.append(textwrap.dedent("\n".join(lines)))
            language = None
        else:
            lines.append(line)
    return blocks


def _json_text(artifact: str) -> tuple[str, str | None]:
    """The artifact if it is JSON, else its one fenced JSON block: (text, None), or ("", why not)."""
    try:
        json.loads(artifact)
        return artifact, None
    except (ValueError, RecursionError) as exc:
        whole = exc
    blocks = fenced_blocks(artifact, JSON_FENCES)
    if not blocks:
        return "", f"the artifact is not JSON ({whole}) and has no ```json block"
    if len(blocks) > 1:
        return "", f"the artifact has {len(blocks)} ```json blocks; it must have exactly one"
    try:
        json.loads(blocks[0])
    except (ValueError, RecursionError) as exc:
        return "", f"the ```json block is not valid JSON: {exc}"
    return blocks[0], None


def python_source(artifact: str) -> tuple[str, str | None]:
    """The artifact's one fenced python block, or the artifact itself when it has none: (source, None),
    or ("", why not) when it has several."""
    blocks = fenced_blocks(artifact, PYTHON_FENCES)
    if len(blocks) > 1:
        return "", f"the artifact has {len(blocks)} ```python blocks; it must have at most one"
    return (blocks[0] if blocks else artifact), None


def foreign_refs(schema: dict[str, Any]) -> list[str]:
    """Every `$ref`/`$dynamicRef` of `schema` that resolves outside it (a URL, a file, an undefined `$id`),
    as "json/path -> uri". Raises ValueError when the schema nests deeper than MAX_SCHEMA_DEPTH."""
    ids: set[str] = set()
    refs: list[tuple[str, str]] = []
    stack: list[tuple[Any, str, str, int]] = [(schema, "", "", 0)]  # node, base URI, JSON pointer, depth
    while stack:
        node, base, path, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels (at {path})")
        if isinstance(node, dict):
            if isinstance(node.get("$id"), str):
                base = urljoin(base, node["$id"])
                ids.add(urldefrag(base).url)
            for keyword in ("$ref", "$dynamicRef"):
                if isinstance(node.get(keyword), str):
                    refs.append((f"{path}/{keyword}", urljoin(base, node[keyword])))
            stack.extend((child, base, f"{path}/{key}", depth + 1) for key, child in node.items()
                         if key not in DATA_KEYWORDS)
        elif isinstance(node, list):
            stack.extend((child, base, f"{path}/{index}", depth + 1) for index, child in enumerate(node))
    # A same-document reference ("#/$defs/x", "#anchor") resolves to "" or to an `$id` defined in the schema.
    return [f"{path} -> {uri}" for path, uri in refs if urldefrag(uri).url not in ids | {""}]


def describe(check: Check) -> str:
    """One line saying what a check asks, for the evaluator's prompt and the UI."""
    if isinstance(check, RegexCheck):
        return f"regex: the artifact must {'' if check.expect == 'match' else 'not '}match `{trim(check.pattern, 200)}`"
    if isinstance(check, LengthCheck):
        low = "0" if check.min is None else str(check.min)
        high = "" if check.max is None else str(check.max)
        return f"length: {low}..{high} {check.unit}"
    if isinstance(check, JsonSchemaCheck):
        return "json_schema: the artifact is JSON valid under the job's schema"
    return f"python: the job's pytest tests pass against the code ({check.tests.count(chr(10)) + 1} lines of tests)"


def code_checks_problem(checks: Sequence[Check], allow_code: bool) -> str | None:
    """Why these checks cannot run on this worker (a python check where code is not allowed), or None."""
    if allow_code:
        return None
    index = next((i for i, check in enumerate(checks) if isinstance(check, PythonCheck)), None)
    if index is None:
        return None
    return (f"checks[{index}]: a python check runs model-written code; the worker allows it only with "
            f"{ALLOW_CODE_SETTING}=true")


async def run_checks(checks: Sequence[Check], artifact: str, *, allow_code: bool) -> list[CheckResult]:
    """Run every check on the artifact's text, in order. Raises CodeChecksNotAllowed, before running any,
    when a python check is among them and `allow_code` is False."""
    problem = code_checks_problem(checks, allow_code)
    if problem is not None:
        raise CodeChecksNotAllowed(problem)
    return [await check.run(artifact) for check in checks]
