#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: installs what the tests need, then pytest.
#   ./scripts/test.sh [pytest args]      e.g. ./scripts/test.sh -m browser
#   ./scripts/test.sh --fast [args]      only the domain's unit tests (`-m fast`): no server, about a minute
# The whole suite runs its test files on FACTORY_TEST_WORKERS (default 2) pytest-xdist workers: most of its time
# is spent waiting on servers, workers and child processes, so two files at once nearly halve it. Each file keeps
# one worker (`--dist loadfile`), so a module's servers are never shared. FACTORY_TEST_WORKERS=0 runs serially.
# Needs Python 3.11+ and, for the Prefect UI test, Debian's `chromium` (installed here with apt-get
# when missing and running as root). The benchmark, not the suite, uses PostgreSQL. The `gpu` extra
# (torch, diffusers) is installed so the GPU-local image path runs for real, on the CPU, with a tiny
# pipeline the tests build: about 3 GB of wheels on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
uv sync --frozen --quiet --extra gpu
fast=()
parallel=(-n "${FACTORY_TEST_WORKERS:-2}" --dist loadfile)
if [ "${1:-}" = "--fast" ]; then shift; fast=(-m fast); parallel=(); fi
if [ ${#fast[@]} = 0 ] && ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's chromium for the Prefect UI test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
exec uv run --frozen --extra gpu pytest "${fast[@]}" "${parallel[@]}" "$@"
