#!/usr/bin/env bash
# schemathesis (PyPI) against a live `fineserve serve` and its OpenAPI document (/openapi.json):
# property-based requests to every operation, bounded by --max-examples per operation. Checks:
# no 5xx, status codes and content types the document lists, and responses that match its schemas.
#
#   scripts/schemathesis.sh [FINESERVE_BINARY] [MODEL_DIR] [WORK_DIR] [MAX_EXAMPLES]
#   (defaults: build-cpu/fineserve, tests/data/golden/opt-preln, build-cpu/schemathesis, 40)
#
# Not in CI (it takes minutes); run by hand after changing the API or docs/openapi.json.
# positive_data_acceptance is not checked: some schema-valid bodies are refused on purpose by
# rules a JSON schema cannot state (min_tokens <= max_tokens, prompt + max_tokens within the
# context, best_of >= n), with 422.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-$here/build-cpu/fineserve}
model=${2:-$here/tests/data/golden/opt-preln}
work=${3:-$here/build-cpu/schemathesis}
examples=${4:-40}
mkdir -p "$work"
venv=$work/venv
if ! "$venv/bin/schemathesis" --version >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check --quiet schemathesis
fi

log=$work/server.log
# Small generation limits keep each request short: the model is tiny, but the fuzzer sends many.
"$binary" serve --model "$model" --port 0 --served-model-name fineserve-st >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
port=""
for _ in $(seq 600); do
  port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "the server exited:"; cat "$log"; exit 1; }
  sleep 0.1
done

"$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "$examples" --seed 1 --request-timeout 120 --workers 1 --no-color \
  --suppress-health-check too_slow,filter_too_much,data_too_large --phases examples,coverage,fuzzing
status=$?
kill -0 $server 2>/dev/null || { echo "the server died:"; tail -20 "$log"; exit 1; }
exit $status
