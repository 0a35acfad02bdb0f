"""A Prefect worker type that runs flow runs inside its own event loop: one resident process for many jobs.

    prefect work-pool create factory-resident --type inprocess
    prefect worker start --pool factory-resident --limit 50

A Factory job spends its life awaiting model APIs, so a process per run (the process pool) pays ~2 s of imports
and ~150 MB for nothing. This worker loads each deployment's flow once (per entrypoint file and its content) and
runs every flow run as a task of its event loop with Prefect's own engine (`flow_engine.run_flow`): each run has its
own run context, logs, state, hooks and heartbeats, as on the process pool.

What a shared process cannot give, it refuses in the run's state instead of ignoring: per-run `env` job
variables (the environment is the worker's) and a `command` (there is no process to start). Cancelling a run in
Prefect cancels its task alone; the engine then runs the flow's `on_cancellation` hooks and marks it Cancelled.
The process's signals stay the worker's (`_patch_engine`): SIGTERM stops the worker, never one run. A worker
that is killed takes its runs with it: with flow-run heartbeats on and the zombie-run automation in
automations/ created, the server marks them Crashed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from uuid import UUID

import anyio
import anyio.abc
from prefect import flow_engine
from prefect._internal.observers import FlowRunCancellingObserver
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter
from prefect.exceptions import TerminationSignal
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.states import Failed
from prefect.utilities.engine import propose_state
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:
    from prefect.client.schemas.objects import APIFlow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

# Loaded flows kept; an entrypoint whose file changed is loaded again, and the least recently used goes.
MAX_LOADED_FLOWS = 16
# Seconds between polls for cancelling runs when the events websocket is down (Prefect's default is 120).
CANCELLATION_POLL_S = 10.0


class RunRefused(ValueError):
    """A run asks for what a shared process cannot give; the message names the job variable."""


@dataclass
class RunControl:
    """What the worker tells one run's task: that Prefect asked to cancel it."""

    cancelling: bool = False
    task: asyncio.Task[Any] | None = field(default=None, repr=False)


# The control of the run whose task this is; read by the engine through `_intent` below.
_run_control: ContextVar[RunControl | None] = ContextVar("factory_inprocess_run_control", default=None)


class InProcessJobConfiguration(BaseJobConfiguration):
    _asked_env: dict[str, Any] = PrivateAttr(default_factory=dict)
    _asked_command: str | None = PrivateAttr(default=None)

    def prepare_for_flow_run(self, flow_run: FlowRun, deployment: DeploymentResponse | None = None,
                             flow: APIFlow | None = None, work_pool: WorkPool | None = None,
                             worker_name: str | None = None, worker_id: UUID | None = None) -> None:
        # Before the base merges Prefect's own variables in: what the deployment and the run asked for.
        self._asked_env = {k: v for k, v in (self.env or {}).items() if v is not None}
        self._asked_command = self.command
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)

    def refusal(self) -> str | None:
        """Why this run cannot run in a shared process, naming the job variable; None when it can."""
        if self._asked_env:
            names = ", ".join(sorted(self._asked_env))
            return (f"job variable `env` ({names}) cannot apply on an inprocess pool: every run shares the "
                    f"worker's environment. Set it on the worker, or run this deployment on a process pool.")
        if self._asked_command:
            return ("job variable `command` cannot apply on an inprocess pool: runs are not started as "
                    "processes. Run this deployment on a process pool.")
        return None

    def deployment(self) -> DeploymentResponse | None:
        related: DeploymentResponse | None = self._related_objects.get("deployment")
        return related


class InProcessVariables(BaseVariables):
    """The base variables; `env` and `command` are refused at run time (they cannot apply in a shared process)."""

    env: dict[str, str | None] = Field(
        default_factory=dict, title="Environment Variables",
        description="Must stay empty: every run shares the worker's environment, so a run that sets `env` is "
                    "refused. Set variables on the worker, or use a process pool.")
    command: str | None = Field(
        default=None,
        description="Must stay empty: runs are tasks of the worker's event loop, not processes started with a "
                    "command.")


class InProcessWorkerResult(BaseWorkerResult):
    """The flow run id, and 0: the run's own state says how it ended."""


def _intent() -> Literal["cancel"] | Any:
    """The engine's termination intent, with this worker's per-run cancel: Prefect reads one intent per
    process (its runner's control channel), which cannot tell concurrent runs apart."""
    control = _run_control.get()
    if control is not None and control.cancelling:
        return "cancel"
    return _ENGINE_INTENT() if _ENGINE_INTENT is not None else None


_ENGINE_INTENT = getattr(flow_engine, "_termination_intent", None)


def _patch_engine() -> None:
    """Make the engine's two process-wide hooks fit runs that share a process.

    - The termination intent becomes per run (`_intent`), so a cancel reaches the run it names.
    - The engine's SIGTERM bridge goes. The first run to start would install it, and a run of its that ends
      in the engine's TerminationSignal (a cancel) re-sends SIGTERM to the process: the worker, and every
      other run with it. The process's signals are the worker's: SIGTERM stops the worker, as on any pool.
    """
    if _ENGINE_INTENT is None or not hasattr(flow_engine, "capture_sigterm"):
        raise RuntimeError("this Prefect's flow engine has no _termination_intent or capture_sigterm: the inprocess "
                           "worker cannot keep its runs apart. Use the Prefect version in uv.lock, or a process "
                           "pool.")
    flow_engine._termination_intent = _intent
    flow_engine.capture_sigterm = nullcontext


class FlowCache:
    """Flows loaded from their entrypoints: once per file content, the least recently used forgotten first."""

    def __init__(self, size: int = MAX_LOADED_FLOWS) -> None:
        self.size = size
        self._flows: OrderedDict[tuple[str, str], Flow[..., Any]] = OrderedDict()

    async def load(self, entrypoint: str, base: Path) -> Flow[..., Any]:
        path, name = entrypoint.rsplit(":", 1)
        script = (base / path).resolve()
        digest = hashlib.sha256(await asyncio.to_thread(script.read_bytes)).hexdigest()
        key = (f"{script}:{name}", digest)
        if key not in self._flows:
            # Importing runs module code: off the event loop, where the other runs are.
            self._flows[key] = await asyncio.to_thread(load_flow_from_entrypoint, key[0], False)
            while len(self._flows) > self.size:
                self._flows.popitem(last=False)
        self._flows.move_to_end(key)
        return self._flows[key]


def working_directory(deployment: DeploymentResponse) -> Path:
    """Where the deployment's entrypoint is relative to: the folder its `set_working_directory` pull step names,
    else its `path`, else the worker's own folder. Other pull steps (a git clone) would fetch code per run."""
    for step in deployment.pull_steps or []:
        for name, args in step.items():
            if name.endswith("set_working_directory"):
                return Path(args["directory"])
            raise RunRefused(f"the deployment's pull step {name} cannot run on an inprocess pool: the worker runs "
                             f"the code it was started with. Remove the step, or use a process pool.")
    return Path(deployment.path or ".")


class InProcessWorker(BaseWorker[InProcessJobConfiguration, InProcessVariables, InProcessWorkerResult]):
    type = "inprocess"
    job_configuration = InProcessJobConfiguration
    job_configuration_variables = InProcessVariables
    _description = ("Runs flow runs concurrently inside the worker's own event loop: one resident process for "
                    "many I/O-bound jobs (`--limit` bounds how many).")
    _display_name = "In-process (resident)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flows = FlowCache()
        self._running: dict[UUID, RunControl] = {}
        self._observer: FlowRunCancellingObserver | None = None

    async def setup(self) -> None:
        _patch_engine()
        await super().setup()

    async def _initialize_after_sync(self) -> None:
        await super()._initialize_after_sync()
        if self._observer is None and self._work_pool is not None:
            # Always on: Prefect's own worker-side cancellation (off by default) only reaches runs not yet started.
            self._observer = await self._exit_stack.enter_async_context(FlowRunCancellingObserver(
                on_cancelling=self._cancel_running, polling_interval=CANCELLATION_POLL_S,
                event_filter=EventFilter(event=EventNameFilter(name=["prefect.flow-run.Cancelling"]),
                                         any_resource=EventAnyResourceFilter(
                                             id=[f"prefect.work-pool.{self._work_pool.id}"]))))

    async def run(self, flow_run: FlowRun, configuration: InProcessJobConfiguration,
                  task_status: anyio.abc.TaskStatus[int] | None = None) -> InProcessWorkerResult:
        logger = self.get_flow_run_logger(flow_run)
        if task_status is not None:
            task_status.started(os.getpid())  # the run's process is the worker's own
        try:
            flow = await self._load(configuration)
        except (RunRefused, OSError, ValueError) as exc:
            logger.error("Refused: %s", exc)
            await propose_state(self.client, Failed(message=f"Refused by the inprocess worker: {exc}"),
                                flow_run_id=flow_run.id)
            return InProcessWorkerResult(status_code=0, identifier=str(flow_run.id))
        with self._controlled(flow_run.id) as control:
            # Its own task, so a cancel reaches this run alone and never the worker's task group.
            running = flow_engine.run_flow(flow, flow_run=flow_run, return_type="state", error_logger=logger.logger)
            control.task = asyncio.ensure_future(cast("Awaitable[Any]", running))
            try:
                await asyncio.wait([control.task])
            finally:
                if not control.task.done():  # the worker is stopping: its runs stop with it
                    control.task.cancel()
        if not control.task.cancelled() and (error := control.task.exception()) is not None:
            if isinstance(error, TerminationSignal):  # the engine's word for a run it marked Cancelled
                logger.info("Run cancelled through Prefect; the worker's other runs go on.")
            else:
                logger.error("Run ended with an error outside its flow: %r", error)
        return InProcessWorkerResult(status_code=0, identifier=str(flow_run.id))

    async def _load(self, configuration: InProcessJobConfiguration) -> Flow[..., Any]:
        if (refusal := configuration.refusal()) is not None:
            raise RunRefused(refusal)
        deployment = configuration.deployment()
        if deployment is None or not deployment.entrypoint:
            raise RunRefused("the inprocess pool runs deployments: this run has no deployment entrypoint")
        flow = await self._flows.load(deployment.entrypoint, working_directory(deployment))
        if not flow.isasync or flow.isgenerator:
            raise RunRefused(f"flow {flow.name!r} is not a plain async flow: it would block the worker's other runs. "
                             f"Run it on a process pool.")
        return flow

    @contextmanager
    def _controlled(self, flow_run_id: UUID) -> Iterator[RunControl]:
        control = RunControl()
        token = _run_control.set(control)
        self._running[flow_run_id] = control
        if self._observer is not None:
            self._observer.add_in_flight_flow_run_id(flow_run_id)
        try:
            yield control
        finally:
            self._running.pop(flow_run_id, None)
            if self._observer is not None:
                self._observer.remove_in_flight_flow_run_id(flow_run_id)
            _run_control.reset(token)

    def _cancel_running(self, flow_run_id: UUID) -> None:
        control = self._running.get(flow_run_id)
        if control is None or control.task is None or control.cancelling:
            return
        control.cancelling = True
        control.task.cancel()

    async def _cancel_run(self, flow_run_id: UUID) -> None:
        if flow_run_id in self._running:
            self._cancel_running(flow_run_id)
            return
        await super()._cancel_run(flow_run_id)
