#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for a bounded time.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFINESERVE_CUDA=OFF \
  -DFINESERVE_FUZZ=ON -DFINESERVE_SANITIZE=address,undefined -DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link \
  -DBUILD_TESTING=ON
targets=()
for f in tests/fuzz/fuzz_*.cpp; do
  [[ -e $f ]] || continue
  targets+=("$(basename "$f" .cpp)")
done
((${#targets[@]})) || { echo "no fuzz targets"; exit 0; }
cmake --build build-fuzz -j "$(nproc)" --target "${targets[@]}"
for t in "${targets[@]}"; do
  name=${t#fuzz_}
  corpus=tests/fuzz/corpus/$name
  work=$(mktemp -d)
  [[ -d $corpus ]] && cp -r "$corpus"/. "$work"/
  echo "fuzzing $t for ${seconds}s"
  FINESERVE_FUZZ_TOKENIZER_DIR=tests/data/gpt2 \
    "build-fuzz/tests/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$work" \
    2>&1 | tail -n 40
  rm -rf "$work"
done
