"""Everything checked before a job spends money: models, prices, retirement, refs.

`plan_job` turns a validated `JobInput` into a `JobPlan` or raises `ConfigurationError`
naming the field to fix.
"""

from __future__ import annotations

import base64
import re
from datetime import date, datetime

from factory.checks import CodeChecksNotAllowed, PythonCheck, code_checks_problem
from factory.errors import ConfigurationError, StorageError
from factory.media import MEDIA_FUNCTIONS, MediaKind, media_api_model, media_provider_name, not_chat
from factory.models import FunctionType, JobInput, StrictModel
from factory.pricing import Price, price_for, retirement
from factory.providers import ImagePart, api_model, provider_name
from factory.settings import FactorySettings
from factory.storage import Location, Storage

RETIREMENT_WARNING_DAYS = 30
# Text refs together: keeps prompts well under the 200K-token mark past which some models bill a
# long-context rate that prices.json does not carry.
MAX_INPUT_TEXT_BYTES = 400_000
MAX_INPUT_IMAGE_BYTES = 5_000_000  # Anthropic's per-image limit
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF87a": "image/gif",
                    b"GIF89a": "image/gif"}


class InputRef(StrictModel):
    """One of `input_refs`, read: text for the prompt, or an image to attach."""

    ref: str
    text: str | None = None
    image: ImagePart | None = None


def image_type(data: bytes) -> str | None:
    """The MIME type of a PNG, JPEG, GIF or WebP image, from its first bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in IMAGE_SIGNATURES.items() if data.startswith(magic)), None)


class ModelPlan(StrictModel):
    """One model a job will call, settled before anything is spent: its name, provider, API name and price.

    Built during `plan_job`: by `plan_model` for the chat roles, `plan_media_model` for a media executor, and
    directly for the audio transcriber; it does not change for the rest of the job. The loop and its tasks
    (flows/loop.py, flows/media.py, tasks/) call `provider` with `api_name`, price each call's worst case and
    its billed usage with `price`, and report `name` in the log and the JobResult.
    """

    name: str
    provider: str
    api_name: str
    price: Price


class JobPlan(StrictModel):
    """A job checked against the deployment: its input, its models, what it has read and where it writes.

    `plan_job` builds it once per flow run, from the validated `JobInput` and the settings, or raises
    `ConfigurationError` naming the field to fix, before anything is spent. The flow (flows/job.py) then
    checks the API keys its models need, logs its `warnings`, opens the event log at `log_path` and hands it
    to the loop (`JobRun`, flows/loop.py), which reads it and never changes it. `artifact_dir` receives every
    iteration's artifact, `final_path` (when `output_ref` names a file) the final one, `result_path` the
    JobResult; `inputs` are the `input_refs`, already read; `media_kind` and `transcriber` are set for media
    jobs (a transcriber for audio only).
    """

    job: JobInput
    executor: ModelPlan
    evaluator: ModelPlan
    media_kind: MediaKind | None = None
    transcriber: ModelPlan | None = None
    artifact_dir: Location
    final_path: Location | None
    log_path: Location
    result_path: Location
    inputs: list[InputRef]
    warnings: list[str]


def retirement_date(model: str) -> date | None:
    """The retirement date in the Anthropic SDK's own table of deprecated models, if listed."""
    from anthropic._data import DEPRECATED_MODELS  # imported here: the SDK costs ~1.4 s to import

    raw = DEPRECATED_MODELS.get(model)
    if raw is None:
        return None
    cleaned = re.sub(r"(\d+)(st|nd|rd|th)", r"\1", raw)
    return datetime.strptime(cleaned, "%B %d, %Y").date()


def plan_model(name: str, field: str, settings: FactorySettings, today: date, warnings: list[str]) -> ModelPlan:
    """A chat model (the evaluator, or the executor of a text job): routed, checked for retirement, priced."""
    if (what := not_chat(name)) is not None:
        raise ConfigurationError(field, f"'{name}' is {what}, not a chat model: this role reads and writes text. "
                                        f"Use a chat model such as '{settings.default_evaluator_model}'.")
    provider = provider_name(name, field)
    retires = retirement_date(api_model(name)) if provider == "anthropic" else None
    if retires is not None and retires <= today:
        raise ConfigurationError(
            field, f"model '{name}' was retired on {retires.isoformat()}; use a current model such as "
            f"'{settings.default_executor_model}'.")
    price = price_for(name, settings, field, today)  # refuses a model past the retirement prices.json records
    if retires is None and (recorded := retirement(name)) is not None:
        retires = recorded.date
    if retires is not None and (retires - today).days <= RETIREMENT_WARNING_DAYS:
        warnings.append(f"`{field}`: model '{name}' retires on {retires.isoformat()}; move to a current model.")
    return ModelPlan(name=name, provider=provider, api_name=api_model(name), price=price)


async def plan_job(job: JobInput, settings: FactorySettings, storage: Storage, today: date) -> JobPlan:
    """Check a job against the deployment before anything is spent.

    Raises:
        ConfigurationError: the first problem found, naming its field.
    """
    warnings: list[str] = []
    kind = MEDIA_FUNCTIONS.get(job.function)
    check_checks(job, kind, settings)
    if kind is None:
        executor = plan_model(job.executor_model or settings.default_executor_model, "executor_model", settings,
                              today, warnings)
    else:
        executor = plan_media_model(job, kind, settings)
    evaluator = plan_model(job.evaluator_model or settings.default_evaluator_model, "evaluator_model", settings,
                           today, warnings)
    job_dir = storage.resolve(job.job_id, "job_id")
    artifact_dir, final_path = _output_paths(job, storage, job_dir)
    log_path = log_path_for(job.job_id, job.log_ref, storage)
    transcriber = None
    if kind is MediaKind.AUDIO:
        name = settings.transcription_model
        transcriber = ModelPlan(name=name, provider="openai", api_name=name,
                                price=price_for(name, settings, "FACTORY_TRANSCRIPTION_MODEL"))
    return JobPlan(
        job=job, executor=executor, evaluator=evaluator, media_kind=kind, transcriber=transcriber,
        artifact_dir=artifact_dir, final_path=final_path,
        log_path=log_path, result_path=result_path_for(log_path), inputs=await _read_inputs(job, storage),
        warnings=warnings,
    )


def check_checks(job: JobInput, kind: MediaKind | None, settings: FactorySettings) -> None:
    """Refuse what a media job cannot use (checks, candidates), python tests on anything but code, and code the
    worker will not run."""
    if job.candidates > 1 and kind is not None:
        raise ConfigurationError("candidates", f"best-of-K is for text jobs; a {job.function.value} job makes one "
                                               "artifact per iteration")
    if job.checks and kind is not None:
        raise ConfigurationError("checks", f"checks read text artifacts; a {job.function.value} job makes media")
    for index, check in enumerate(job.checks):
        if isinstance(check, PythonCheck) and job.function is not FunctionType.CODE_GENERATION:
            raise ConfigurationError("checks", f"checks[{index}]: a python check tests Python code; use it with "
                                               f"function CODE_GENERATION")
    if (problem := code_checks_problem(job.checks, settings.allow_code_checks)) is not None:
        raise CodeChecksNotAllowed(problem)


def plan_media_model(job: JobInput, kind: MediaKind, settings: FactorySettings) -> ModelPlan:
    """The generation model of an IMAGE/AUDIO/VIDEO job: routed, priced, and given only what it can use."""
    if job.input_refs:
        raise ConfigurationError("input_refs", f"{job.function.value} models take a text prompt only; put what "
                                               "the reference says into the seed, or drop input_refs.")
    name = job.executor_model or getattr(settings, f"default_{kind.value}_model")
    provider = media_provider_name(name, kind, "executor_model")
    return ModelPlan(name=name, provider=provider, api_name=media_api_model(name),
                     price=price_for(name, settings, "executor_model"))


def log_path_for(job_id: str, log_ref: str | None, storage: Storage) -> Location:
    """Where a job's event log lives: `log_ref`, else `<job_id>/log.json` under the storage root."""
    return storage.resolve(log_ref, "log_ref") if log_ref else storage.resolve(job_id, "job_id").child("log.json")


def result_path_for(log_path: Location) -> Location:
    """The JobResult goes beside the log, in the same store: `result.json` beside `log.json`, else
    `<log stem>.result.json`, so jobs that share a log folder keep their own results."""
    return log_path.sibling("result.json" if log_path.name == "log.json" else f"{log_path.stem}.result.json")


def _output_paths(job: JobInput, storage: Storage, job_dir: Location) -> tuple[Location, Location | None]:
    """A folder-like `output_ref` holds the iterations; a file-like one also receives the final artifact."""
    if not job.output_ref:
        return job_dir.child("artifacts"), None
    location = storage.resolve(job.output_ref, "output_ref")
    if location.suffix and not job.output_ref.endswith("/"):
        return location.sibling(f"{location.stem}-iterations"), location
    return location, None


async def _read_inputs(job: JobInput, storage: Storage) -> list[InputRef]:
    inputs = []
    for index, ref in enumerate(job.input_refs):
        field = f"input_refs[{index}]"
        location = storage.resolve(ref, field)
        try:
            data = await storage.read(location)
        except StorageError as exc:
            raise ConfigurationError(field, f"'{ref}' cannot be read ({exc}); nothing was spent.") from exc
        inputs.append(_input_ref(ref, field, data))
        if sum(len(i.text.encode()) for i in inputs if i.text) > MAX_INPUT_TEXT_BYTES:
            raise ConfigurationError(field, f"the text input refs up to '{ref}' exceed {MAX_INPUT_TEXT_BYTES} bytes "
                                            f"in all; split the job or shorten the references.")
    return inputs


def _input_ref(ref: str, field: str, data: bytes) -> InputRef:
    if kind := image_type(data):
        if len(data) > MAX_INPUT_IMAGE_BYTES:
            raise ConfigurationError(field, f"'{ref}' is a {len(data)}-byte image; at most {MAX_INPUT_IMAGE_BYTES}.")
        return InputRef(ref=ref, image=ImagePart(media_type=kind, data=base64.b64encode(data).decode()))
    if len(data) > MAX_INPUT_TEXT_BYTES:
        raise ConfigurationError(field, f"'{ref}' is {len(data)} bytes; text refs may hold {MAX_INPUT_TEXT_BYTES} "
                                        f"bytes in all.")
    try:
        return InputRef(ref=ref, text=data.decode())
    except UnicodeDecodeError as exc:
        raise ConfigurationError(field, f"'{ref}' is neither UTF-8 text nor a PNG, JPEG, GIF or WebP image.") from exc
