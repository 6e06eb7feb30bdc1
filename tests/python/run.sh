#!/usr/bin/env bash
# Runs one suite of Python client tests (clients from PyPI) against a live `fineserve serve`.
#   run.sh SUITE PYTHON FINESERVE_BINARY MODEL_DIR WORK_DIR
# Suites:
#   clients            test_openai_client.py (`openai`) and test_tgi_client.py (`text-generation`)
#   structured_output  test_structured_output.py (`openai`, outputs validated by `jsonschema`), with
#                      tool_template.jinja, a short tool-aware chat template, as the chat template
# The virtual environment lives in WORK_DIR/venv (reused across runs); exits 77 (ctest: skipped)
# only when it cannot be made (e.g. pip without network access); any other failure fails.
set -uo pipefail
suite=$1 binary=$3 model=$4 work=$5
export FS_PYTHON=$2
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../../scripts/live_server.sh"
mkdir -p "$work"

case $suite in
  clients)
    packages=(openai text-generation) check="import openai, text_generation"
    serve_args=() scripts=(test_openai_client.py test_tgi_client.py) ;;
  structured_output)
    packages=(openai jsonschema) check="import openai, jsonschema"
    serve_args=(--chat-template "$here/tool_template.jinja") scripts=(test_structured_output.py) ;;
  *) echo "unknown suite: $suite"; exit 2 ;;
esac

fs_venv "$work/venv" "$check" "${packages[@]}" || exit $?
fs_start_server "$work/server.log" "$binary" --model "$model" --served-model-name tiny-opt "${serve_args[@]}" || exit 1
status=0
for s in "${scripts[@]}"; do
  FINESERVE_URL=$FS_URL FINESERVE_MODEL=tiny-opt "$work/venv/bin/python" "$here/$s" || status=1
done
fs_stop_server || status=1
exit $status
