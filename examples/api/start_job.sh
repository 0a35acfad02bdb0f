#!/usr/bin/env bash
# Start one Factory job through the Prefect REST API and print its JobResult. Needs curl and python3 only.
#
#   ./examples/api/start_job.sh ['{"seed": "...", "objective": "...", "limits": {"budget_usd": 2}}']
#
#   1. GET  /deployments/name/factory/job     the deployment's id
#   2. POST /deployments/{id}/create_flow_run {"parameters": {...}, "idempotency_key": ...}: a run, to start now
#   3. GET  /flow_runs/{id}                   every POLL_S (2) s until its state type is final, at most TIMEOUT_S (3600)
#   4. POST /artifacts/filter                 the run's `factory-<job>-summary` artifact: its "## JobResult" section
#                                             holds the JobResult as a fenced json block, printed here
#
# PREFECT_API_URL defaults to the quickstart's server; PREFECT_API_KEY (Prefect Cloud) or PREFECT_API_AUTH_STRING
# (`user:password`, a server with basic auth) are sent when set. Exits 0 only when the flow run COMPLETED, 2 when it
# is still going after TIMEOUT_S.
set -euo pipefail

api=${PREFECT_API_URL:-http://127.0.0.1:4200/api}
api=${api%/}
deployment=${DEPLOYMENT:-factory/job}
timeout_s=${TIMEOUT_S:-3600}
poll_s=${POLL_S:-2}
params=${1:-'{"seed": "Write a haiku about rivers.", "objective": "A haiku (5-7-5 syllables) about rivers."}'}

auth=()
if [ -n "${PREFECT_API_KEY:-}" ]; then auth=(-H "Authorization: Bearer $PREFECT_API_KEY")
elif [ -n "${PREFECT_API_AUTH_STRING:-}" ]; then auth=(-u "$PREFECT_API_AUTH_STRING")
fi

# call METHOD PATH [JSON]: the response body; an error answer is shown with its body and ends the script.
# curl retries what is transient (timeouts, 408, 429, 5xx: a busy SQLite server answers 503) with backoff.
call() {
  local body
  if ! body=$(curl -sS --fail-with-body -m 30 --retry 5 --retry-max-time 90 -X "$1" ${auth[@]+"${auth[@]}"} \
                -H "Content-Type: application/json" ${3:+--data "$3"} "$api$2"); then
    echo "start_job: $1 $api$2 failed: $body" >&2
    return 1
  fi
  printf '%s' "$body"
}

# field KEY...: the value at KEY... of the JSON document on stdin.
field() {
  python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1:]:
    value = value[key]
print("" if value is None else value)' "$@"
}

# The idempotency key makes a retried create_flow_run return the run the first attempt created.
body=$(python3 -c 'import json, sys, uuid
params = json.loads(sys.argv[1])
if not isinstance(params, dict):
    sys.exit("start_job: the parameters must be a JSON object")
print(json.dumps({"parameters": params, "idempotency_key": f"start_job-{uuid.uuid4()}"}))' "$params")

deployment_id=$(call GET "/deployments/name/$deployment" | field id)
flow_run_id=$(call POST "/deployments/$deployment_id/create_flow_run" "$body" | field id)
echo "start_job: flow run $flow_run_id of $deployment" >&2

deadline=$((SECONDS + timeout_s))
last=""
while :; do
  state=$(call GET "/flow_runs/$flow_run_id" | field state type)
  if [ "$state" != "$last" ]; then echo "start_job: $state" >&2; last=$state; fi
  case $state in COMPLETED | FAILED | CANCELLED | CRASHED) break ;; esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "start_job: flow run $flow_run_id is still $state after ${timeout_s}s" >&2
    exit 2
  fi
  sleep "$poll_s"
done

# `like_` is matched as ILIKE '%<value>%', so keep only the key that ends with -summary.
filter=$(python3 -c 'import json, sys
print(json.dumps({"artifacts": {"flow_run_id": {"any_": [sys.argv[1]]}, "key": {"like_": "%-summary"}},
                  "sort": "CREATED_DESC", "limit": 20}))' "$flow_run_id")
printed=true
call POST /artifacts/filter "$filter" | python3 -c 'import json, re, sys
for artifact in json.load(sys.stdin):
    found = re.search(r"## JobResult\n(`{3,})json\n(.*?)\n\1", artifact.get("data") or "", re.S)
    if (artifact.get("key") or "").endswith("-summary") and found:
        print(json.dumps(json.loads(found.group(2)), indent=2))
        break
else:
    sys.exit(3)' || printed=false
if [ "$state" != COMPLETED ]; then
  message=$(call GET "/flow_runs/$flow_run_id" | field state message)
  echo "start_job: flow run $flow_run_id ended $state${message:+: $message}" >&2
  exit 1
fi
if ! $printed; then
  echo "start_job: the flow run published no JobResult summary" >&2
  exit 1
fi
