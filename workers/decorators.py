"""`@runpod`: bind a flow to a `runpod` work pool, as prefect-aws's `@ecs` does for ECS.

    @runpod(work_pool="factory-gpu")
    @flow
    async def generate_image_gpu(request: MediaRequest) -> MediaResult: ...

Calling the bound flow runs it on the pool's RunPod endpoint as its own flow run: Prefect bundles
the flow, uploads the bundle through the pool's storage (`prefect work-pool storage configure s3
factory-gpu --bucket ...`), and the endpoint's handler.py executes it. `submit_to_work_pool` leaves
it to a `runpod` worker already polling the pool; a plain call starts a worker in-process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

from prefect import Flow
from prefect.bundles import BundleLauncher
from prefect.flows import InfrastructureBoundFlow, bind_flow_to_infrastructure

from workers.runpod import RunPodWorker

P = ParamSpec("P")
R = TypeVar("R")


class RunPodFlow(InfrastructureBoundFlow[P, R]):
    """A flow bound to a `runpod` pool, that its bundle names instead of carrying.

    Prefect pickles a bundled flow's project modules by value unless they are installed in site-packages.
    This project is installed in the RunPod image, and cloudpickle cannot rebuild its pydantic models or
    Prefect worker classes by value (they come back as look-alike classes, or fail to register), so the
    bundle holds the flow's module and name, plus the result options Prefect set on it for the run.
    The flow must be bound at module level under its function's name.
    """

    def with_options(self, **options: Any) -> RunPodFlow[P, R]:
        bound = super().with_options(**options)
        bound.__class__ = RunPodFlow
        return cast(RunPodFlow[P, R], bound)

    def __reduce__(self) -> tuple[Callable[..., RunPodFlow[Any, Any]], tuple[str, str, Any, bool | None]]:
        return _named_flow, (self.fn.__module__, self.fn.__name__, self.result_storage, self.persist_result)


def _named_flow(module: str, name: str, result_storage: Any, persist_result: bool | None) -> RunPodFlow[Any, Any]:
    flow: RunPodFlow[Any, Any] = getattr(importlib.import_module(module), name)
    return flow.with_options(result_storage=result_storage, persist_result=persist_result)


def runpod(
    work_pool: str,
    include_files: Sequence[str] | None = None,
    launcher: BundleLauncher | None = None,
    *,
    include_files_base_dir: Path | str | None = None,
    **job_variables: Any,
) -> Callable[[Flow[P, R]], RunPodFlow[P, R]]:
    """Bind a flow to the `runpod` work pool `work_pool`.

    Args:
        work_pool: a pool of type `runpod` with bundle storage configured.
        include_files: file patterns, relative to the flow's file, to ship with the bundle.
        launcher: overrides how the bundle steps are launched (e.g. the image's own Python).
        include_files_base_dir: where `include_files` are resolved from.
        **job_variables: override the pool's job variables (endpoint_id, execution_timeout_s, ...).
    """
    for index, pattern in enumerate(include_files or ()):
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"include_files[{index}] must be a non-empty string")

    def decorator(flow: Flow[P, R]) -> RunPodFlow[P, R]:
        bound = bind_flow_to_infrastructure(
            flow, work_pool=work_pool, job_variables=job_variables, worker_cls=RunPodWorker, launcher=launcher,
            include_files=list(include_files) if include_files is not None else None,
            include_files_base_dir=include_files_base_dir,
        )
        bound.__class__ = RunPodFlow
        return cast(RunPodFlow[P, R], bound)

    return decorator
