#!/usr/bin/env bash
# The house rules, as CI runs them before the tests: ruff (pyflakes, pycodestyle, import order, bugbear,
# pyupgrade, no stale `noqa`) on the whole tree, and mypy (strict on the `factory` domain package).
# Configured in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
uv run --frozen ruff check .
uv run --frozen mypy
