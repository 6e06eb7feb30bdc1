# Sourced (not run) by the scripts that drive a live `fineserve serve` with third-party Python
# tools: tests/python/run.sh (the openai, text-generation and jsonschema clients), scripts/lm_eval.sh
# and scripts/schemathesis.sh. Defines:
#
#   fs_venv VENV CHECK PACKAGE...   a virtual environment in VENV holding PACKAGE..., reused when
#                                   `VENV/bin/python -c CHECK` already succeeds. Returns 77 (what
#                                   ctest reads as "skipped") only when the environment cannot be
#                                   made: no venv module, or pip cannot reach the package index.
#   fs_start_server LOG BINARY ARG...
#                                   starts `BINARY serve --port 0 ARG...` with its log in LOG, waits
#                                   until /ready answers 200, and sets FS_PORT, FS_URL and
#                                   FS_SERVER (its pid). An EXIT trap stops it if the caller dies.
#   fs_stop_server                  SIGTERM; fails (with the log) unless the server drains and
#                                   exits 0.
# The interpreter that makes the venv is $FS_PYTHON (default python3).

fs_venv() {
  local venv=$1 check=$2
  shift 2
  "$venv/bin/python" -c "$check" 2>/dev/null && return 0
  "${FS_PYTHON:-python3}" -m venv "$venv" || { echo "cannot create a virtual environment: skipping"; return 77; }
  # --timeout/--retries: offline, pip gives up in seconds instead of minutes.
  "$venv/bin/pip" install --disable-pip-version-check --quiet --timeout 30 --retries 2 "$@" ||
    { echo "pip cannot install $*: skipping"; return 77; }
  "$venv/bin/python" -c "$check" || { echo "installed $*, but \`$check\` fails"; return 1; }
}

# GET /ready on 127.0.0.1:$1 through bash's /dev/tcp (no curl needed): succeeds on 200.
# A subshell: the descriptor closes with it, and a refused connection cannot end the caller.
_fs_ready() (
  exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
  printf 'GET /ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  read -r -t 5 _ status _ <&3
  [ "$status" = 200 ]
) 2>/dev/null

fs_start_server() {
  FS_LOG=$1
  local binary=$2
  shift 2
  "$binary" serve --port 0 "$@" >"$FS_LOG" 2>&1 &
  FS_SERVER=$!
  trap 'kill -TERM $FS_SERVER 2>/dev/null; wait $FS_SERVER 2>/dev/null' EXIT
  FS_PORT=""
  local _i
  for _i in $(seq 1200); do  # up to two minutes (loading under ASan on a busy machine)
    FS_PORT=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$FS_LOG" | grep -o '[0-9]*$' || true)
    [ -n "$FS_PORT" ] && _fs_ready "$FS_PORT" && break
    kill -0 "$FS_SERVER" 2>/dev/null || { echo "the server exited:"; cat "$FS_LOG"; return 1; }
    FS_PORT=""
    sleep 0.1
  done
  [ -n "$FS_PORT" ] || { echo "the server did not become ready:"; cat "$FS_LOG"; return 1; }
  FS_URL=http://127.0.0.1:$FS_PORT
}

fs_stop_server() {
  kill -0 "$FS_SERVER" 2>/dev/null || { echo "the server died during the run:"; tail -40 "$FS_LOG"; trap - EXIT; return 1; }
  kill -TERM "$FS_SERVER"
  local status=0
  wait "$FS_SERVER" || status=$?
  trap - EXIT
  [ $status -eq 0 ] || { echo "the server exited with $status after SIGTERM:"; tail -40 "$FS_LOG"; return 1; }
}
