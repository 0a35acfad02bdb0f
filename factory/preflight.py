"""Everything checked before a job spends money: models, prices, retirement, refs.

`plan_job` turns a validated `JobInput` into a `JobPlan` or raises `ConfigurationError`
naming the field to fix.
"""

from __future__ import annotations

import re
from datetime import date, datetime

from factory.errors import ConfigurationError, StorageError
from factory.models import TEXT_FUNCTIONS, JobInput, StrictModel
from factory.pricing import Price, price_for
from factory.providers import api_model, provider_name
from factory.settings import FactorySettings
from factory.storage import Location, Storage

RETIREMENT_WARNING_DAYS = 30
MAX_INPUT_REF_BYTES = 1_000_000


class ModelPlan(StrictModel):
    name: str
    provider: str
    api_name: str
    price: Price


class JobPlan(StrictModel):
    job: JobInput
    executor: ModelPlan
    evaluator: ModelPlan
    artifact_dir: Location
    final_path: Location | None
    log_path: Location
    result_path: Location
    context: list[tuple[str, str]]
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
    provider = provider_name(name, field)
    retires = retirement_date(api_model(name)) if provider == "anthropic" else None
    if retires is not None and retires <= today:
        raise ConfigurationError(
            field, f"model '{name}' was retired on {retires.isoformat()}; use a current model such as "
            f"'{settings.default_executor_model}'.")
    if retires is not None and (retires - today).days <= RETIREMENT_WARNING_DAYS:
        warnings.append(f"`{field}`: model '{name}' retires on {retires.isoformat()}; move to a current model.")
    return ModelPlan(name=name, provider=provider, api_name=api_model(name), price=price_for(name, settings, field))


async def plan_job(job: JobInput, settings: FactorySettings, storage: Storage, today: date) -> JobPlan:
    """Check a job against the deployment before anything is spent.

    Raises:
        ConfigurationError: the first problem found, naming its field.
    """
    if job.function not in TEXT_FUNCTIONS:
        raise ConfigurationError(
            "function", f"{job.function.value} needs a media generation model, which this deployment does not "
            f"have yet; use one of {', '.join(sorted(f.value for f in TEXT_FUNCTIONS))}.")
    warnings: list[str] = []
    executor = plan_model(job.executor_model or settings.default_executor_model, "executor_model", settings,
                          today, warnings)
    evaluator = plan_model(job.evaluator_model or settings.default_evaluator_model, "evaluator_model", settings,
                           today, warnings)
    job_dir = storage.resolve(job.job_id, "job_id")
    artifact_dir, final_path = _output_paths(job, storage, job_dir)
    log_path = log_path_for(job.job_id, job.log_ref, storage)
    return JobPlan(
        job=job, executor=executor, evaluator=evaluator, artifact_dir=artifact_dir, final_path=final_path,
        log_path=log_path, result_path=job_dir.child("result.json"), context=await _read_inputs(job, storage),
        warnings=warnings,
    )


def log_path_for(job_id: str, log_ref: str | None, storage: Storage) -> Location:
    return storage.resolve(log_ref, "log_ref") if log_ref else storage.resolve(job_id, "job_id").child("log.json")


def _output_paths(job: JobInput, storage: Storage, job_dir: Location) -> tuple[Location, Location | None]:
    """A folder-like `output_ref` holds the iterations; a file-like one also receives the final artifact."""
    if not job.output_ref:
        return job_dir.child("artifacts"), None
    location = storage.resolve(job.output_ref, "output_ref")
    if location.suffix and not job.output_ref.endswith("/"):
        return location.sibling(f"{location.stem}-iterations"), location
    return location, None


async def _read_inputs(job: JobInput, storage: Storage) -> list[tuple[str, str]]:
    context = []
    for index, ref in enumerate(job.input_refs):
        field = f"input_refs[{index}]"
        location = storage.resolve(ref, field)
        try:
            data = await storage.read(location)
        except StorageError as exc:
            raise ConfigurationError(field, f"'{ref}' cannot be read ({exc}); nothing was spent.") from exc
        if len(data) > MAX_INPUT_REF_BYTES:
            raise ConfigurationError(field, f"'{ref}' is {len(data)} bytes; at most {MAX_INPUT_REF_BYTES} are read.")
        try:
            context.append((ref, data.decode()))
        except UnicodeDecodeError as exc:
            raise ConfigurationError(field, f"'{ref}' is not UTF-8 text; only text input refs are read.") from exc
    return context
