#!/usr/bin/env bash
# Sets everything up and runs every test: installs the Debian dependencies, builds, runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --test-dir "${FINESERVE_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)"
