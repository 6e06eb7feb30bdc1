#!/usr/bin/env bash
# Runs tests/python/test_openai_client.py (the `openai` client from PyPI) and test_tgi_client.py
# (the `text-generation` client from PyPI) against a live server.
#   run.sh PYTHON FINESERVE_BINARY MODEL_DIR WORK_DIR
# Creates a virtual environment in WORK_DIR (reused across runs) and pip-installs both clients
# into it; exits 77 (ctest: skipped) only when pip cannot install them (e.g. without network
# access); any other failure fails the test.
set -uo pipefail
python=$1 binary=$2 model=$3 work=$4
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"
venv=$work/venv
if ! "$venv/bin/python" -c "import openai, text_generation" 2>/dev/null; then
  "$python" -m venv "$venv" || { echo "cannot create a virtual environment: skipping"; exit 77; }
  "$venv/bin/pip" install --disable-pip-version-check --quiet --timeout 30 openai text-generation ||
    { echo "pip cannot install openai and text-generation: skipping"; exit 77; }
fi

log=$work/server.log
"$binary" serve --model "$model" --port 0 --served-model-name tiny-opt >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT

port=""
for _ in $(seq 600); do
  port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  [ -n "$port" ] && "$python" - "$port" <<'PY' && break
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2)
except Exception:
    sys.exit(1)
PY
  kill -0 $server 2>/dev/null || { echo "the server exited:"; cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "the server did not start:"; cat "$log"; exit 1; }

FINESERVE_URL=http://127.0.0.1:$port FINESERVE_MODEL=tiny-opt "$venv/bin/python" "$here/test_openai_client.py"
status=$?
FINESERVE_URL=http://127.0.0.1:$port "$venv/bin/python" "$here/test_tgi_client.py" || status=1
kill -TERM $server
wait $server
server_status=$?
trap - EXIT
[ $server_status -eq 0 ] || { echo "the server exited with $server_status after SIGTERM:"; cat "$log"; exit 1; }
exit $status
