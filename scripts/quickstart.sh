#!/usr/bin/env bash
# Set everything up and run one real Factory job through the `factory/job` deployment.
#
#   ./scripts/quickstart.sh ['{"seed": "...", "objective": "..."}']
#
# Installs the project (uv), starts a local Prefect server on SQLite in the background if none
# answers at PREFECT_API_URL, creates the `factory-local` work pool as a resident (`inprocess`) pool,
# deploys, creates the zombie-run automation, starts a worker with heartbeats in the background, runs
# the job with --watch and prints its JobResult. Uses Anthropic
# when ANTHROPIC_API_KEY is set, else OpenAI when OPENAI_API_KEY is set, else the `dry-run` model.
# Background processes write their PID and log under .factory/; stop them with
#   kill $(cat .factory/worker.pid) $(cat .factory/server.pid)
set -euo pipefail
cd "$(dirname "$0")/.."

state_dir=.factory
mkdir -p "$state_dir"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:4200/api}"
export FACTORY_STORAGE_ROOT="${FACTORY_STORAGE_ROOT:-$HOME/.factory/storage}"

command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
uv sync --frozen --quiet --inexact  # inexact: keeps the `gpu` extra the test suite installs
prefect() { uv run --frozen --quiet prefect "$@"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
healthy() { curl -fsS -m 2 "$PREFECT_API_URL/health" >/dev/null 2>&1; }

if ! healthy; then
  hostport=${PREFECT_API_URL#http://}; hostport=${hostport%%/*}
  echo "Starting a Prefect server on $hostport (log: $state_dir/server.log)"
  nohup uv run --frozen prefect server start --host "${hostport%%:*}" --port "${hostport##*:}" \
    >"$state_dir/server.log" 2>&1 &
  echo $! >"$state_dir/server.pid"
  for _ in $(seq 1 120); do healthy && break; sleep 1; done
  healthy || { echo "The Prefect server did not answer; see $state_dir/server.log" >&2; exit 1; }
fi

# Later `prefect ...` commands in your shell must reach this server, not start a temporary one.
prefect config view 2>/dev/null | grep -q "^PREFECT_API_URL=.*(from profile)" \
  || { prefect config set PREFECT_API_URL="$PREFECT_API_URL" >/dev/null
       echo "Saved PREFECT_API_URL=$PREFECT_API_URL in your Prefect profile."; }
# A pool made earlier keeps its type (a `process` pool still works); a new one is resident: one worker process for
# many jobs (README, "Many jobs on one worker").
prefect work-pool inspect factory-local >/dev/null 2>&1 || prefect work-pool create factory-local --type inprocess
prefect --no-prompt deploy --all
uv run --frozen python -m blocks.register
# A killed worker's runs are marked Crashed by the server when their heartbeats stop.
curl -fsS -m 10 -X POST -H 'Content-Type: application/json' -d '{}' "$PREFECT_API_URL/automations/filter" \
  | grep -q '"name":"factory-crash-zombie-runs"' \
  || prefect automation create --from-file automations/crash-zombie-runs.yaml >/dev/null

if ! alive "$state_dir/worker.pid"; then
  echo "Starting a worker on pool factory-local (log: $state_dir/worker.log)"
  PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 nohup uv run --frozen prefect worker start --pool factory-local --limit 50 \
    >"$state_dir/worker.log" 2>&1 &
  echo $! >"$state_dir/worker.pid"
fi

if [ -n "${ANTHROPIC_API_KEY:-}" ]; then models='"executor_model": "claude-sonnet-5-5", "evaluator_model": "claude-sonnet-5-5"'
elif [ -n "${OPENAI_API_KEY:-}" ]; then models='"executor_model": "gpt-5.4-mini", "evaluator_model": "gpt-5.4"'
else models='"executor_model": "dry-run", "evaluator_model": "dry-run"'; echo "No API key set: using the dry-run model."
fi
job_id="quickstart-$(date +%Y%m%d-%H%M%S)"
params=${1:-'{"seed": "Write a haiku about rivers.", "objective": "A haiku (5-7-5 syllables) about rivers."}'}
params=$(uv run --frozen python -c 'import json,sys; p=json.loads(sys.argv[1]); p.setdefault("job_id", sys.argv[2]); p.update(json.loads("{" + sys.argv[3] + "}") | p); print(json.dumps(p))' "$params" "$job_id" "$models")
job_id=$(uv run --frozen python -c 'import json,sys; print(json.loads(sys.argv[1])["job_id"])' "$params")

prefect deployment run factory/job --params "$params" --watch --watch-timeout 3600
echo "JobResult ($FACTORY_STORAGE_ROOT/$job_id/result.json):"
cat "$FACTORY_STORAGE_ROOT/$job_id/result.json"; echo
