"""The public contract of a Factory job: inputs, verdicts, per-call usage and the result.

Names, bounds and defaults follow the reference JobInput/JobResult (see DESIGN.md). The
flow's parameters use the same annotated types, so Prefect's parameter schema and this
model refuse the same inputs with the same field names.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from factory.checks import CheckResult, Checks

MAX_SEED_CHARS = 50_000
MAX_OBJECTIVE_CHARS = 5_000
MAX_INPUT_REFS = 20
MAX_CALLBACK_URL_CHARS = 2048
# http(s) only, and no userinfo: the authority (up to the first `/`, `?` or `#`) holds no `@`. Where the URL may
# lead is decided later, against its resolved addresses (factory/callback.py); this is what the schema can say.
CALLBACK_URL_PATTERN = r"^https?://[^\s/?#@\\]+(?:[/?#]\S*)?$"


class StrictModel(BaseModel):
    """The base of the Factory's models: unknown fields are refused, and so is an invalid assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FunctionType(StrEnum):
    """What a job makes: the kind of artifact, which picks the executor (a chat or media model) and its prompts."""

    TEXT_GENERATION = "TEXT_GENERATION"
    IMAGE_GENERATION = "IMAGE_GENERATION"
    AUDIO_GENERATION = "AUDIO_GENERATION"
    VIDEO_GENERATION = "VIDEO_GENERATION"
    CODE_GENERATION = "CODE_GENERATION"
    DOCUMENT_GENERATION = "DOCUMENT_GENERATION"
    MULTIMODAL = "MULTIMODAL"


class JobStatus(StrEnum):
    """Where a job stands; a finished job's status follows from its `StopReason`."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    CONVERGED = "CONVERGED"
    EXHAUSTED = "EXHAUSTED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class StopReason(StrEnum):
    """Why a job stopped: the objective met (CONFORMITY), a limit reached, no progress, an error or a cancel."""

    CONFORMITY = "CONFORMITY"
    MAX_CYCLES = "MAX_CYCLES"
    BUDGET = "BUDGET"
    TIMEOUT = "TIMEOUT"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"
    PLATEAU = "PLATEAU"

    @property
    def status(self) -> JobStatus:
        """The status this ending gives the job: CONVERGED, FAILED, CANCELLED, or else EXHAUSTED."""
        return {
            StopReason.CONFORMITY: JobStatus.CONVERGED,
            StopReason.ERROR: JobStatus.FAILED,
            StopReason.CANCELLED: JobStatus.CANCELLED,
        }.get(self, JobStatus.EXHAUSTED)


class Event(StrEnum):
    """The events of a job's event log (factory/eventlog.py), in the order a job writes them."""

    JOB_CREATED = "JOB_CREATED"
    JOB_STARTED = "JOB_STARTED"
    ITERATION_START = "ITERATION_START"
    EXECUTOR_CALL = "EXECUTOR_CALL"
    EXECUTOR_RESPONSE = "EXECUTOR_RESPONSE"
    EVALUATOR_CALL = "EVALUATOR_CALL"
    EVALUATOR_RESPONSE = "EVALUATOR_RESPONSE"
    ITERATION_END = "ITERATION_END"
    JOB_CONVERGED = "JOB_CONVERGED"
    JOB_MAX_ITERATIONS = "JOB_MAX_ITERATIONS"
    JOB_BUDGET_EXHAUSTED = "JOB_BUDGET_EXHAUSTED"
    JOB_ERROR = "JOB_ERROR"
    JOB_PLATEAU = "JOB_PLATEAU"
    CHECKS_RESULT = "CHECKS_RESULT"
    JOB_COMPLETED = "JOB_COMPLETED"
    CALLBACK_SENT = "CALLBACK_SENT"
    CALLBACK_FAILED = "CALLBACK_FAILED"


# Parameter types shared by JobInput and the flow signature.
Seed = Annotated[str, Field(min_length=1, max_length=MAX_SEED_CHARS, description="The instruction for the executor.")]
Objective = Annotated[
    str, Field(min_length=1, max_length=MAX_OBJECTIVE_CHARS, description="What 'done' means, for the evaluator.")
]
JobId = Annotated[
    str | None,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Names the job; re-running with the same id reuses every finished call. Default: the flow run id.",
    ),
]
Ref = Annotated[str, Field(min_length=1, max_length=2048)]
# The bound is in the type, so the flow's parameter schema (what Prefect checks when a run is created) carries it.
InputRefs = Annotated[
    list[Ref],
    Field(max_length=MAX_INPUT_REFS, description="Local files (under the storage root) or s3:// objects given to "
          "the executor as reference material: UTF-8 text, or PNG/JPEG/GIF/WebP images."),
]
ModelName = Annotated[
    str | None,
    Field(min_length=1, max_length=200, description="Default: FACTORY_DEFAULT_*_MODEL."),
]

CallbackUrl = Annotated[
    str | None,
    Field(max_length=MAX_CALLBACK_URL_CHARS, pattern=CALLBACK_URL_PATTERN,
          description="An http:// or https:// URL (no user:password@) that receives the JobResult as a signed JSON "
                      "POST when the job ends. Loopback, private and link-local hosts are refused unless the worker "
                      "allows them (FACTORY_CALLBACK_ALLOWED_HOSTS)."),
]


Candidates = Annotated[int, Field(ge=1, le=8, description="Best-of-K: artifacts made at once per iteration, each "
                                  "checked and judged; the best carries forward.")]


class Limits(StrictModel):
    """When to stop if the evaluator is never satisfied."""

    max_cycles: int = Field(default=10, ge=1, le=50, description="Iterations at most.")
    budget_usd: float = Field(default=10.0, ge=0.1, le=100.0, description="Hard ceiling on spend, in USD.")
    timeout_minutes: int = Field(default=60, ge=1, le=480, description="Wall-clock deadline for the whole job.")
    min_confidence: float = Field(
        default=0.8, ge=0.5, le=1.0, description="Evaluator confidence needed, with `converged`, to stop."
    )
    patience: int | None = Field(
        default=None, ge=1, le=10, description="Stop (PLATEAU) when the best confidence so far has not risen by "
        "FACTORY_PLATEAU_MIN_GAIN for this many iterations in a row. Default: never.")


class JobInput(StrictModel):
    """One job as submitted: what to make, what 'done' means, its inputs, where it writes, its limits and models."""

    seed: Seed
    objective: Objective
    function: FunctionType = FunctionType.TEXT_GENERATION
    job_id: str = Field(default_factory=lambda: str(uuid.uuid4()), pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    input_refs: InputRefs = Field(default_factory=list)
    output_ref: Ref | None = None
    log_ref: Ref | None = None
    limits: Limits = Field(default_factory=Limits)
    executor_model: ModelName = None
    evaluator_model: ModelName = None
    callback_url: CallbackUrl = None
    checks: Checks = Field(default_factory=list)
    candidates: Candidates = 1


class Usage(StrictModel):
    """What one call was billed for, split the way prices are: tokens, and media units."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    images: int = 0
    megapixels: int = Field(default=0, description="Billed megapixels (2**20 pixels), rounded up per image.")
    characters: int = 0
    media_seconds: Decimal = Field(default=Decimal(0), description="Seconds of media produced or transcribed.")
    gpu_seconds: Decimal = Field(default=Decimal(0), description="RunPod execution time, rounded up to the second.")

    @property
    def total(self) -> int:
        """Every token billed: input, output, cache reads and writes."""
        return (self.input_tokens + self.output_tokens + self.cache_read_tokens
                + self.cache_write_5m_tokens + self.cache_write_1h_tokens)


class CallRecord(StrictModel):
    """One billed provider call, or one attempt that failed after it was (or may have been) billed."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Charges the budget once, re-runs too.")
    iteration: int = 0
    role: str
    model: str
    usage: Usage
    cost_usd: Decimal
    duration_ms: int
    usage_known: bool = Field(default=True, description="False: the reply said nothing of its usage, so the call "
                                                         "was charged its worst case.")
    failed: str | None = Field(default=None,
                                description="Why a billed attempt failed; it was retried or ended the job.")


class Verdict(StrictModel):
    """The evaluator's judgement of one artifact, and what the executor should change next."""

    converged: bool
    confidence: float = Field(ge=0.0, le=1.0)
    strengths: list[str] = Field(default_factory=list)
    weaknesses: list[str] = Field(default_factory=list)
    feedback_for_executor: str = ""
    evaluator_model: str = ""
    cost_usd: float = 0.0
    parse_error: str | None = Field(default=None, description="Set when the evaluator's reply could not be read.")


class IterationOutput(StrictModel):
    """What the executor made in one iteration: the stored artifact, its hash, and what it cost."""

    artifact_ref: str
    artifact_hash: str
    executor_model: str
    cost_usd: float
    tokens_used: int
    metadata: dict[str, Any] = Field(default_factory=dict)


class CandidateDetail(StrictModel):
    """One of an iteration's best-of-K candidates: where it is, how it fared, what it cost."""

    candidate: int = Field(ge=1)
    artifact_ref: str
    checks_passed: bool
    converged: bool
    confidence: float
    cost_usd: float = Field(description="Its executor call and its evaluation (none when a check failed).")
    chosen: bool = Field(description="The one the iteration kept: checks passed, converged, confidence.")


class IterationDetail(StrictModel):
    """One iteration, as the JobResult sums it up."""

    iteration: int
    duration_ms: int
    converged: bool
    confidence: float
    cost_usd: float
    artifact_ref: str
    usage_known: bool = Field(default=True, description="False when a call of this iteration was charged its worst "
                                                         "case, its usage being unknown.")
    checks: list[CheckResult] = Field(default_factory=list, description="The job's checks on this artifact, in "
                                      "order; when one failed, the evaluator was not asked.")
    candidates: list[CandidateDetail] = Field(default_factory=list, description="With `candidates` > 1: every "
                                              "candidate of the iteration; `artifact_ref` is the chosen one's.")


class TokenTotals(StrictModel):
    """The job's billed tokens, summed over every call (failed billed attempts included)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = Field(default=0, description="5-minute and 1-hour cache writes together.")


class JobResult(StrictModel):
    """How a job ended, its final artifact and cost: what the flow returns, stores by the log and calls back with."""

    job_id: str
    status: JobStatus
    stop_reason: StopReason
    converged: bool
    final_artifact_ref: str | None
    last_functional_iteration: int | None
    total_iterations: int
    total_cost_usd: float
    other_cost_usd: float = Field(default=0.0, description="Billed calls outside iterations_detail: attempts of an "
                                  "iteration cut short before its artifact (an error, the budget, the deadline).")
    total_duration_ms: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    executor_model_used: str
    evaluator_model_used: str
    iterations_detail: list[IterationDetail] = Field(default_factory=list)
    log_ref: str | None = None
    error: str | None = None
    dry_run: bool = Field(default=False, description="True when no model ran: every artifact is a placeholder.")
    usage: TokenTotals = Field(default_factory=TokenTotals, description="Tokens billed, beside total_cost_usd.")
    cache_savings_usd: float = Field(default=0.0, description="What prompt caching saved against sending every "
                                     "cached token as plain input (negative while cache writes outweigh reads).")


def utcnow() -> datetime:
    """The current time in UTC, timezone-aware."""
    return datetime.now(UTC)
