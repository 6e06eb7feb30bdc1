#!/usr/bin/env bash
# Configures and builds FineServe into build/ (CPU backend always; CUDA backend when nvcc is found).
# Extra CMake arguments come from FINESERVE_CMAKE_ARGS, e.g. "-DFINESERVE_WERROR=ON".
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${FINESERVE_BUILD_DIR:-build}
# shellcheck disable=SC2086
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE="${FINESERVE_BUILD_TYPE:-Release}" ${FINESERVE_CMAKE_ARGS:-}
cmake --build "$build_dir" -j "$(nproc)"
