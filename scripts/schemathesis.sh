#!/usr/bin/env bash
# schemathesis (PyPI) against a live `fineserve serve` and its OpenAPI document (/openapi.json):
# property-based requests to every operation, bounded by --max-examples per operation. Checks:
# no 5xx, status codes and content types the document lists, and responses that match its schemas.
#
#   scripts/schemathesis.sh [FINESERVE_BINARY] [MODEL_DIR] [WORK_DIR] [MAX_EXAMPLES]
#   (defaults: build-cpu/fineserve, tests/data/golden/opt-preln, build-cpu/schemathesis, 40)
#
# ctest runs it (label `harness`) with a smaller MAX_EXAMPLES to stay within CI's time; run it by
# hand with the default after changing the API or docs/openapi.json. Exits 77 (ctest: skipped)
# only when its virtual environment (WORK_DIR/venv, reused) cannot be made, e.g. offline.
# positive_data_acceptance is not checked: some schema-valid bodies are refused on purpose by
# rules a JSON schema cannot state (min_tokens <= max_tokens, prompt + max_tokens within the
# context, best_of >= n), with 422.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-$root/build-cpu/fineserve}
model=${2:-$root/tests/data/golden/opt-preln}
work=${3:-$root/build-cpu/schemathesis}
examples=${4:-40}
source "$root/scripts/live_server.sh"
mkdir -p "$work"
work=$(cd "$work" && pwd)
venv=$work/venv
fs_venv "$venv" "import schemathesis" schemathesis==4.32.5 || exit $?

fs_start_server "$work/server.log" "$binary" --model "$model" --served-model-name fineserve-st || exit 1
# The fuzzer's own state (.hypothesis, reports) goes to WORK_DIR, not the source tree.
(cd "$work" && "$venv/bin/schemathesis" run "$FS_URL/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --max-examples "$examples" --seed 1 --request-timeout 120 --workers 1 --no-color \
  --suppress-health-check too_slow,filter_too_much,data_too_large --phases examples,coverage,fuzzing)
status=$?
fs_stop_server || status=1
exit $status
