"""Money and iterations to conformity: the plain loop against checks, best-of-K with patience, and prompt caching.

    uv run python benchmarks/quality_cost.py

Everything runs in this process against 127.0.0.1: Prefect's own test server (`prefect_test_harness`) and the
provider emulator from tests/, which bills prompt caching as Anthropic documents it. Each row is one scripted job
run through the `factory` flow; money is what the emulator billed, at the Factory's price table.

1. Caching: five iterations over a ~20,000-token stable prefix (seed and reference material), with the cache
   point off (the model priced without `min_cache_tokens`) and on.
2. Checks: a code job whose first two artifacts fail their tests while the evaluator approves everything; without
   checks it "converges" on broken code; with them, no evaluator call is spent on a failing artifact.
3. Best-of-3 with patience: each draft's quality is a fixed pseudo-random draw in 0.40..0.95, converged from
   0.85 (the same draws for every run of a curve, so both loops judge the same drafts 1, 2, 3, ...); one candidate
   per iteration against three, within the same $1 budget; and a curve that stalls at 0.6, with and without
   `limits.patience`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = Path(tempfile.mkdtemp(prefix="factory-quality-"))
os.environ.update({"PREFECT_HOME": str(WORK / "prefect"), "FACTORY_STORAGE_ROOT": str(WORK / "storage"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "FACTORY_ALLOW_CODE_CHECKS": "true",
                   "PREFECT_LOGGING_LEVEL": "WARNING"})

from tests.emulators.llm import API_KEY, Emulator, Script  # noqa: E402
from tests.emulators.server import ThreadedServer  # noqa: E402

NOT_YET = {"converged": False, "confidence": 0.4, "strengths": ["clear"], "weaknesses": ["too short"],
           "feedback_for_executor": "Make it longer."}
DONE = {"converged": True, "confidence": 0.92, "strengths": ["meets it"], "weaknesses": [], "feedback_for_executor": ""}
MODEL = "claude-sonnet-5-5"
ADD_TESTS = "from solution import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
ATTEMPTS = [f"```python\ndef add(a, b):\n    return a {op} b\n```" for op in ("-", "*", "+")]
CONVERGED_AT = 0.85
CURVES = (1, 2, 3, 4, 5)


def quality(draft: int, seed: int) -> float:
    """A draft's fixed quality on the scripted curve: the same for every run that makes that draft."""
    return round(random.Random(seed * 1000 + draft).uniform(0.4, 0.95), 3)


def judge_by_draft(seed: int, ceiling: float = 1.0):
    def judge(prompt: str) -> dict[str, Any]:
        artifact = prompt.split("Artifact to judge:", 1)[1]
        score = min(ceiling, quality(int(re.search(r"Draft (\d+)", artifact).group(1)), seed))
        return {"converged": score >= CONVERGED_AT, "confidence": score, "strengths": ["s"],
                "weaknesses": [] if score >= CONVERGED_AT else ["w"], "feedback_for_executor": "Improve it."}
    return judge


def billed(emulator: Emulator) -> Decimal:
    from factory.pricing import price_table
    from factory.settings import get_settings

    table = price_table(get_settings())
    return sum((Decimal(b.input_tokens) * table[b.model].input + Decimal(b.output_tokens) * table[b.model].output
                + Decimal(b.cache_read_tokens) * (table[b.model].cache_read or 0)
                + Decimal(b.cache_write_tokens) * (table[b.model].cache_write_5m or 0)) / Decimal(1_000_000)
               for b in emulator.billed) or Decimal(0)


async def run(emulator: Emulator, script: Script, **params: Any) -> dict[str, Any]:
    from factory.settings import get_settings
    from factory.storage import get_storage
    from flows.job import factory

    get_settings.cache_clear()
    get_storage.cache_clear()
    emulator.reset(script)
    job = {"seed": "Write a short poem about rivers.", "objective": "A short poem about rivers.",
           "executor_model": MODEL, "evaluator_model": MODEL, **params}
    state = await factory(**job, return_state=True)
    result = await state.result(raise_on_failure=False)
    evaluator_calls = sum(1 for b in emulator.billed if b.role == "evaluator")
    return {"stop": result.stop_reason.value, "iterations": result.total_iterations, "cost": billed(emulator),
            "reported": Decimal(str(result.total_cost_usd)), "evaluator_calls": evaluator_calls,
            "cache_read": result.usage.cache_read_tokens, "final": result.final_artifact_ref}


def no_cache_point() -> None:
    """Price the model as the table does, without `min_cache_tokens`: the Factory marks no cache point."""
    from factory.pricing import price_table
    from factory.settings import get_settings

    price = price_table(get_settings())[MODEL]
    plain = price.model_copy(update={"min_cache_tokens": None}).model_dump(mode="json", exclude_none=True,
                                                                          exclude={"published"})
    os.environ["FACTORY_PRICES"] = json.dumps({MODEL: plain})


async def rows(emulator: Emulator) -> list[tuple[str, str, dict[str, Any]]]:
    storage = WORK / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "reference.txt").write_text("A fact about the river basin, measured in 2026. " * 800)
    long_job = {"seed": "Write the report the reference asks for. "
                + "Context sentence about rivers and their banks. " * 1000,
                "input_refs": ["reference.txt"], "limits": {"max_cycles": 5}}
    five = Script(verdicts=[NOT_YET] * 4 + [DONE])
    out = []
    no_cache_point()
    out.append(("caching", "plain loop (no cache point)", await run(emulator, five, **long_job)))
    del os.environ["FACTORY_PRICES"]
    out.append(("caching", "cached stable prefix", await run(emulator, five, **long_job)))
    code = {"seed": "Write add(a, b).", "objective": "A correct add.", "function": "CODE_GENERATION"}
    out.append(("checks", "plain loop (evaluator only)", await run(emulator, Script(executor=ATTEMPTS, verdicts=[DONE]),
                                                                 **code)))
    out.append(("checks", "python check", await run(emulator, Script(executor=ATTEMPTS, verdicts=[DONE]), **code,
                                                    checks=[{"type": "python", "tests": ADD_TESTS}])))
    for seed in CURVES:
        curve = {"limits": {"max_cycles": 12, "budget_usd": 1.0}}
        out.append((f"curve {seed}", "plain loop", await run(emulator, Script(judge=judge_by_draft(seed)), **curve)))
        out.append((f"curve {seed}", "best-of-3 + patience 3", await run(
            emulator, Script(judge=judge_by_draft(seed)), candidates=3,
            limits={**curve["limits"], "patience": 3})))
    stall = {"limits": {"max_cycles": 12}}
    out.append(("stalling curve", "plain loop", await run(emulator, Script(judge=judge_by_draft(9, 0.6)), **stall)))
    out.append(("stalling curve", "patience 3", await run(emulator, Script(judge=judge_by_draft(9, 0.6)),
                                                          limits={"max_cycles": 12, "patience": 3})))
    return out


def table(results: list[tuple[str, str, dict[str, Any]]]) -> str:
    lines = ["| job | loop | stop | iterations | evaluator calls | cache-read tokens | money (billed) | vs plain |",
             "|---|---|---|---|---|---|---|---|"]
    plain: dict[str, Decimal] = {}
    for job, loop, r in results:
        assert r["cost"] == r["reported"], (job, loop, r)  # reported money is the bill, to the token
        base = plain.setdefault(job, r["cost"])
        ratio = "" if base == r["cost"] and loop.startswith("plain") else f"{(r['cost'] / base - 1) * 100:+.0f}%"
        lines.append(f"| {job} | {loop} | {r['stop']} | {r['iterations']} | {r['evaluator_calls']} | "
                     f"{r['cache_read']} | ${r['cost']:.6f} | {ratio} |")
    return "\n".join(lines)


async def main() -> None:
    from prefect.testing.utilities import prefect_test_harness

    emulator = Emulator()
    server = ThreadedServer(emulator.app).start()
    os.environ.update({"ANTHROPIC_BASE_URL": server.url, "ANTHROPIC_API_KEY": API_KEY})
    try:
        with prefect_test_harness(server_startup_timeout=120):
            results = await rows(emulator)
    finally:
        server.stop()
    print(table(results))
    (WORK / "results.json").write_text(json.dumps([(j, loop, {k: str(v) for k, v in r.items()})
                                                   for j, loop, r in results], indent=2))


if __name__ == "__main__":
    asyncio.run(main())
