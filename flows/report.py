"""What a person sees of a job in the Prefect UI: artifacts, keyed per job so re-runs add versions.

Keys: `factory-<job>-iteration-<n>` (markdown: artifact, verdict, cost; `-image`: a thumbnail of an image
or a video's first frame), `factory-<job>-iterations`
(table), `factory-<job>-budget` (markdown, a new version after every call), `factory-<job>-progress`
(progress), `factory-<job>-summary` (markdown JobResult).

Artifacts are sent by one background consumer, in order, off the loop's critical path: each is an
API round trip, and five per iteration would otherwise add ~100 ms to every iteration. `close()`
waits for the last of them, then for Prefect to send the events they and the job's tasks raised.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_image_artifact,
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.events.worker import EventsWorker, should_emit_events

from factory.checks import CheckResult, trim
from factory.models import CandidateDetail, FunctionType, JobResult, Limits, Verdict

MAX_INLINE_CHARS = 4000
TABLE_DETAIL_CHARS = 300  # a check's detail in the iteration's table; the full one is in the JobResult
EVENTS_FLUSH_TIMEOUT_S = 30.0
logger = logging.getLogger(__name__)


def artifact_key(job_id: str, name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for one of a job's artifacts."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", job_id.lower())).strip("-")
    return f"factory-{slug}-{name}"


def fenced(text: str, language: str = "") -> str:
    """Text in a code fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) if items else "_none_"


def _checks_table(checks: list[CheckResult]) -> str:
    rows = ["| check | result | detail |", "|---|---|---|"]
    for c in checks:
        detail = trim(c.detail, TABLE_DETAIL_CHARS).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {c.type} | {'passed' if c.passed else '**failed**'} | {detail} |")
    return "\n".join(rows)


def _candidates_table(candidates: list[CandidateDetail]) -> str:
    rows = ["| candidate | checks | verdict | confidence | cost | artifact |", "|---|---|---|---|---|---|"]
    for c in candidates:
        rows.append(f"| c{c.candidate}{' (kept)' if c.chosen else ''} | {'passed' if c.checks_passed else 'failed'} "
                    f"| {'converged' if c.converged else 'not converged'} | {c.confidence:.2f} | ${c.cost_usd:.6f} "
                    f"| `{c.artifact_ref}` |")
    return "\n".join(rows)


def _caching_line(result: JobResult) -> str:
    usage = result.usage
    if not (usage.cache_read_tokens or usage.cache_write_tokens):
        return ""
    return (f"\n\n**Prompt caching:** {usage.cache_read_tokens} tokens read from the cache, "
            f"{usage.cache_write_tokens} written; saved ${result.cache_savings_usd:.6f} against no caching.")


def _checks_cell(checks: list[CheckResult] | None) -> str:
    """The iterations table's checks column: `3/3`, or empty where the job has none."""
    return f"{sum(c.passed for c in checks)}/{len(checks)}" if checks else ""


class JobReport:
    """What a person sees of one job in the Prefect UI: the artifacts published as it runs, keyed per job.

    `JobRun` (flows/loop.py) builds one per run, from the job's id, function and limits, and calls
    `iteration` after each judged iteration (its markdown, the iterations table kept in `rows`, the
    progress), `picture` for generated images and video (flows/media.py), `budget` before each call and at
    the end, and `summary` last, which waits until everything queued has been sent (`close`). A call only
    queues its artifact: one background task sends them in order, and a send that fails is logged, never
    raised, so the UI cannot fail a paid-for job.
    """

    def __init__(self, job_id: str, function: FunctionType, limits: Limits) -> None:
        self.job_id = job_id
        self.function = function
        self.limits = limits
        self.rows: list[dict[str, Any]] = []
        self._progress_id: UUID | None = None
        self._queue: asyncio.Queue[Callable[[], Awaitable[object]] | None] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None

    def _send(self, publish: Callable[[], Awaitable[object]]) -> None:
        if self._sender is None:
            self._sender = asyncio.create_task(self._drain())
        self._queue.put_nowait(publish)

    async def _drain(self) -> None:
        while (publish := await self._queue.get()) is not None:
            try:
                await publish()
            except Exception as exc:  # noqa: BLE001 - a lost UI artifact must not fail a paid-for job
                logger.warning("Could not publish a Prefect artifact: %r", exc)

    async def close(self) -> None:
        """Wait until every artifact queued so far has been sent, and every event Prefect raised for them."""
        if self._sender is not None:
            self._queue.put_nowait(None)
            await self._sender
            self._sender = None
        await flush_events()

    def iteration(self, n: int, artifact: str, ref: str, extension: str, verdict: Verdict, cost: Decimal,
                  spent: Decimal, duration_ms: int, checks: list[CheckResult] | None = None,
                  candidates: list[CandidateDetail] | None = None) -> None:
        shown = artifact[:MAX_INLINE_CHARS]
        if len(artifact) > MAX_INLINE_CHARS:
            shown += f"\n... {len(artifact) - MAX_INLINE_CHARS} more characters in the full file"
        language = extension.lstrip(".") if self.function is FunctionType.CODE_GENERATION else "markdown"
        state = "converged" if verdict.converged else "not converged"
        markdown = "\n\n".join([
            f"# Iteration {n} of job `{self.job_id}`",
            f"**Verdict:** {state}, confidence {verdict.confidence:.2f}"
            + (f" (**{verdict.parse_error}**)" if verdict.parse_error else ""),
            f"**Cost:** ${cost:.6f} (job so far ${spent:.6f}) · **Duration:** {duration_ms / 1000:.1f} s",
            f"**Artifact:** `{ref}`",
            *(["## Checks\n" + _checks_table(checks)] if checks else []),
            *(["## Candidates\n" + _candidates_table(candidates)] if candidates else []),
            "## Strengths\n" + _bullets(verdict.strengths),
            "## Weaknesses\n" + _bullets(verdict.weaknesses),
            "## Feedback for the executor\n" + (verdict.feedback_for_executor or "_none_"),
            "## Artifact\n" + fenced(shown, language),
        ])
        self._send(lambda: acreate_markdown_artifact(
            markdown, key=artifact_key(self.job_id, f"iteration-{n}"),
            description=f"Iteration {n}: {state}, confidence {verdict.confidence:.2f}"))
        self.rows.append({"n": n, "converged": verdict.converged, "confidence": round(verdict.confidence, 4),
                          "cost_usd": float(cost), "cumulative_usd": float(spent),
                          "duration_s": round(duration_ms / 1000, 2), "artifact_ref": ref,
                          "checks": _checks_cell(checks),
                          "candidates": f"{len(candidates)}, kept c{next(c.candidate for c in candidates if c.chosen)}"
                          if candidates else ""})
        rows = list(self.rows)
        self._send(lambda: acreate_table_artifact(rows, key=artifact_key(self.job_id, "iterations"),
                                                  description=f"Iterations of job {self.job_id}"))
        self.progress(n, spent)

    def picture(self, n: int, jpeg: bytes) -> None:
        """A thumbnail of iteration `n`'s image (or a video's first frame), inline as a data URL: the UI shows
        it whatever the storage, with no link that expires."""
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        self._send(lambda: acreate_image_artifact(url, key=artifact_key(self.job_id, f"iteration-{n}-image"),
                                                  description=f"Iteration {n}, as generated"))

    def budget(self, spent: Decimal, next_worst: Decimal | None, next_call: str | None) -> None:
        limit = Decimal(str(self.limits.budget_usd))
        lines = ["| spent | limit | remaining | worst case of the next call |", "|---|---|---|---|",
                 f"| ${spent:.6f} | ${limit:.2f} | ${limit - spent:.6f} | "
                 + (f"${next_worst:.6f} ({next_call})" if next_worst is not None else "none: the job has stopped")
                 + " |"]
        self._send(lambda: acreate_markdown_artifact(f"# Budget of job `{self.job_id}`\n\n" + "\n".join(lines),
                                                     key=artifact_key(self.job_id, "budget"),
                                                     description=f"${spent:.4f} of ${limit:.2f} spent"))

    def progress(self, iterations: int, spent: Decimal) -> None:
        """Iterations over max_cycles, or budget share, whichever is closer to the end, in percent."""
        share = max(iterations / self.limits.max_cycles, float(spent) / self.limits.budget_usd)
        percent = min(100.0, round(share * 100, 1))
        description = f"{iterations}/{self.limits.max_cycles} iterations, ${float(spent):.4f} spent"
        self._send(lambda: self._publish_progress(percent, description))

    async def _publish_progress(self, percent: float, description: str) -> None:
        if self._progress_id is None:
            self._progress_id = await acreate_progress_artifact(
                percent, key=artifact_key(self.job_id, "progress"), description=description)
        else:
            await aupdate_progress_artifact(self._progress_id, percent, description=description)

    async def summary(self, result: JobResult) -> None:
        """Queue the final summary and wait until every artifact of the job has been sent."""
        if result.converged:
            self._send(lambda: self._publish_progress(100.0, "converged"))
        head = (f"# Job `{result.job_id}`: {result.status.value} ({result.stop_reason.value})\n\n"
                f"{result.total_iterations} iteration(s), ${result.total_cost_usd:.6f}, "
                f"{result.total_duration_ms / 1000:.1f} s. Final artifact: `{result.final_artifact_ref}`"
                + _caching_line(result)
                + (f"\n\n**Error:** {result.error}" if result.error else ""))
        self._send(lambda: acreate_markdown_artifact(
            head + "\n\n## JobResult\n" + fenced(result.model_dump_json(indent=2), "json"),
            key=artifact_key(result.job_id, "summary"),
            description=f"{result.status.value}: {result.stop_reason.value}"))
        await self.close()


async def flush_events(timeout_s: float = EVENTS_FLUSH_TIMEOUT_S) -> None:
    """Wait, at most `timeout_s`, until Prefect's client has sent every event raised so far in this process.

    Each artifact (and each task run) raises an event that Prefect sends from a background queue, which it
    otherwise empties only when the process exits, after the flow run has ended: the handler's temporary
    server is then stopped while it still records them (ERROR tracebacks from its task-run recorder), and an
    event raised once that exit drain has stopped the queue fails ("Cannot put items in a stopped service
    instance"). Sent here, while the run still goes, nothing is left for the exit, whatever the entry.
    """
    if not should_emit_events():
        return
    worker = EventsWorker.instance()
    loop = asyncio.get_running_loop()
    sent: asyncio.Future[None] = loop.create_future()

    def wait() -> None:  # a daemon thread: a queue that never empties must not keep the process alive
        worker.wait_until_empty()
        try:
            loop.call_soon_threadsafe(lambda: None if sent.done() else sent.set_result(None))
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=wait, name="factory-events-flush", daemon=True).start()
    try:
        await asyncio.wait_for(sent, timeout_s)
    except TimeoutError:
        logger.warning("Prefect had not sent every event of the job after %.0f s; the rest are sent when the "
                       "process exits", timeout_s)
