#!/usr/bin/env bash
# Create or update the `factory-gpu` work pool (type `runpod`) that GPU generation runs on, with bundle and
# result storage in S3:
#
#   ./scripts/gpu-pool.sh <runpod_endpoint_id> [job_variable=value ...]
#   ./scripts/gpu-pool.sh abc123xyz execution_timeout_s=900
#   prefect worker start --pool factory-gpu        # with RUNPOD_API_KEY set, or the pool's api_key variable
#
# Needs PREFECT_API_URL, FACTORY_S3_BUCKET and the `factory-aws` block (`python -m blocks.register` saves it).
# FACTORY_GPU_POOL names another pool; FACTORY_BUNDLE_PYTHON is the Python that runs the bundle steps where
# the job flow runs and in the RunPod image (default: `python`, the project's environment on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
endpoint="${1:?usage: $0 <runpod_endpoint_id> [job_variable=value ...]}"
shift
pool="${FACTORY_GPU_POOL:-factory-gpu}"
: "${FACTORY_S3_BUCKET:?set FACTORY_S3_BUCKET: bundles and GPU results are stored there}"
template="$(mktemp)"
trap 'rm -f "$template"' EXIT
prefect work-pool get-default-base-job-template --type runpod > "$template"
python - "$template" "endpoint_id=$endpoint" "$@" <<'PY'
import json
import sys

path, *assignments = sys.argv[1:]
template = json.load(open(path))
variables = template["variables"]["properties"]
for assignment in assignments:
    name, _, value = assignment.partition("=")
    if name not in variables:
        sys.exit(f"unknown job variable {name!r}; known: {', '.join(sorted(variables))}")
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # a plain string
    variables[name]["default"] = value
json.dump(template, open(path, "w"))
PY
prefect work-pool create "$pool" --type runpod --base-job-template "$template" --overwrite
prefect work-pool storage configure s3 "$pool" --bucket "$FACTORY_S3_BUCKET" \
  --aws-credentials-block-name factory-aws --launcher "${FACTORY_BUNDLE_PYTHON:-python}"
