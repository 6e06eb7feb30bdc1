#!/usr/bin/env bash
# Sets everything up and serves the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
exec build/fineserve serve "$@"
