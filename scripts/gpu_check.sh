#!/usr/bin/env bash
# One command that turns a short GPU session into evidence (docs/gpu.md says how to read it):
#
#   scripts/gpu_check.sh OUTDIR            on a machine with an NVIDIA GPU (run from anywhere)
#   scripts/gpu_check.sh --dry-run OUTDIR  everything that needs no GPU: configure, build, the
#                                          ptxas report with its no-spill check, the CLI flags and
#                                          test names the GPU steps use, the serve checker (cpu vs cpu)
#
# Steps, in order, each with its own time limit and log; a failing step never stops the run:
# facts, configure, build, ptxas, ctest -R 'Cuda|Nccl', nccl (world of one), compute-sanitizer
# memcheck / racecheck / initcheck, bench gemm, bench decode, serve (cuda vs cpu, token for token),
# and on a GPU with more than 100 GB an OPT-175B-wide int4 decode.
#
# OUTDIR receives at most 8 files (a GPU session returns no more): summary.md (the table printed at
# the end), summary.json, logs.tar.gz (every step's log), ptxas.md, gemm_gpu.json, decode_cuda.json,
# serve_compare.json and, on a >100 GB GPU, decode_opt175b.json.
#
# Environment: FINESERVE_BUILD_DIR (default build-gpu; CI's dry run reuses build), JOBS (default
# nproc), FINESERVE_GPU_CHECK_BUDGET_S (default 540, 1800 for a dry run: a step never runs past
# the budget; the steps after it are skipped), FINESERVE_GPU_CHECK_STEPS (space-separated step names:
# run only those, e.g. "build ctest" to rerun a failed step). A `.devkit` folder at the repository root (extracted Debian packages of the
# server's dependencies, docs/gpu.md) is used when present.
# shellcheck disable=SC2317  # the step functions are called through `step`
set -uo pipefail
set -m  # every step runs as its own process group (see step)
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
if [[ $# -ne 1 || ${1:-} == -* ]]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
BUILD=${FINESERVE_BUILD_DIR:-build-gpu}
[[ $BUILD = /* ]] || BUILD=$ROOT/$BUILD
JOBS=${JOBS:-$(nproc)}
ONLY=${FINESERVE_GPU_CHECK_STEPS:-}
BUDGET=${FINESERVE_GPU_CHECK_BUDGET_S:-$([[ $DRY == 1 ]] && echo 1800 || echo 540)}
FS=$BUILD/fineserve
export PATH=/usr/local/cuda/bin:$PATH
START=$SECONDS

# The server's Debian dependencies, when the machine lacks them (see docs/gpu.md).
if [[ -d $ROOT/.devkit/usr ]]; then
  export PKG_CONFIG_PATH=$ROOT/.devkit/usr/lib/x86_64-linux-gnu/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
  export CMAKE_PREFIX_PATH=$ROOT/.devkit/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
  export LD_LIBRARY_PATH=$ROOT/.devkit/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

# ---- the GPU, if any ----------------------------------------------------------------------------
GPU_NAME="" GPU_CC="" GPU_MEM_MIB=0 GPU_DRIVER=""
if [[ $DRY == 0 ]] && command -v nvidia-smi >/dev/null; then
  IFS=',' read -r GPU_NAME GPU_CC GPU_MEM_MIB GPU_DRIVER < <(nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version \
    --format=csv,noheader,nounits | head -1 | sed 's/, */,/g')
fi
if [[ $DRY == 0 && -z $GPU_CC ]]; then
  echo "error: no GPU found by nvidia-smi; use --dry-run on a machine without one" >&2
  exit 2
fi
# CUDA architectures: only the GPU present (a real GPU run), both targets otherwise.
# Compute capability 9.0 builds sm_90a: the Hopper kernels are written for it.
if [[ -n $GPU_CC ]]; then
  cc=${GPU_CC/./}
  [[ $cc == 90 ]] && cc=90a
  CUDA_ARCHS="$cc-real"
  PTX_ARCHS="sm_$cc"
else
  CUDA_ARCHS=""
  PTX_ARCHS="sm_80 sm_90a"
fi
BIG_GPU=0
(( GPU_MEM_MIB > 100 * 1000 * 1000 / 1024 )) && BIG_GPU=1  # > 100 GB

# What the GPU steps run (the dry run checks that these binaries, flags and tests exist).
# shellcheck disable=SC2054  # the commas belong to the flags' values
GEMM_ARGS=(bench gemm --models opt-175b,opt-13b --m 1,4,16,64,128,512,2048 --formats int4-g128,int4-col,int8-col
           --min-seconds 0.05 --rotate-mb 128 --out "$OUT/gemm_gpu.json")
DECODE_ARGS=(bench decode --device cuda --models opt-13b --weights fp16 int8 int4 --batches 1 8 32 --layers 8
             --prompt-tokens 64 --new-tokens 32 --out "$OUT/decode_cuda.json")
# OPT-175B at its real width on one GPU; a slice of its 96 layers, so the weights are generated in
# host memory and uploaded within the budget (tokens/s scale with the layer count).
DECODE175_ARGS=(bench decode --device cuda --models opt-175b --weights int4 --batches 1 8 --layers 12
                --prompt-tokens 64 --new-tokens 16 --out "$OUT/decode_opt175b.json")
SAN_KERNELS='CudaGemm.EveryPathAtAwkwardSizesWithPoisonedWorkspaces:Act/CudaOps.AttentionWithQueryStartOffset/F16:Act/CudaOps.AttentionAndLinearWithPoisonedWorkspaces/F16'
SAN_MODELS='Fixtures/CudaGolden.QuantizedMatchesTheCpuBackend/opt_preln'
HOT_KERNELS='^(gemv_kernel|tc_kernel|attention_kernel|attention_combine_kernel)<'

# ---- the step runner ------------------------------------------------------------------------------
NAMES=() STATUS=() SECS=() NOTES=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4"); }

# step NAME LIMIT_S FUNCTION: runs FUNCTION in a subshell with its output in logs/NN-NAME.log, under
# the smaller of LIMIT_S and what is left of the budget. Exit 77 = skipped (its last line says why).
step() {
  local name=$1 limit=$2 fn=$3
  local n=${#NAMES[@]}
  local log
  log=$LOGS/$(printf '%02d' "$n")-$name.log
  if [[ -n $ONLY && " $ONLY " != *" $name "* ]]; then
    record "$name" skip 0 "not in FINESERVE_GPU_CHECK_STEPS"
    return
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 15)); then
    echo "=== [$name] skipped: the ${BUDGET} s budget is spent"
    record "$name" skip 0 "budget spent"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== [$name] start at $((SECONDS - START)) s (limit ${limit} s, log $(basename "$log"))"
  local t0=$SECONDS
  # The step runs as its own job (process group, set -m): the watchdog can stop it and whatever it
  # started (ctest, the sanitizer, a server) at once.
  ("$fn") >"$log" 2>&1 &
  local pid=$!
  (sleep "$limit"; touch "$WORK/timeout-$n"; kill -TERM -- "-$pid" 2>/dev/null; sleep 10; kill -KILL -- "-$pid" 2>/dev/null) &
  local dog=$!
  wait "$pid"
  local rc=$?
  kill -- "-$dog" 2>/dev/null
  wait "$dog" 2>/dev/null
  local secs=$((SECONDS - t0)) status note=""
  if [[ -e $WORK/timeout-$n ]]; then
    status=timeout; note="stopped after ${limit} s"
  else
    case $rc in
      0) status=pass ;;
      77) status=skip; note=$(tail -1 "$log") ;;
      *) status=fail; note="exit $rc" ;;
    esac
  fi
  tail -n 8 "$log" | sed 's/^/    /'
  echo "--- [$name] $status in ${secs} s${note:+ ($note)}"
  record "$name" "$status" "$secs" "$note"
}

# check_cli "SUBCOMMAND..." ARGS...: every --flag in ARGS appears in `fineserve SUBCOMMAND --help`.
check_cli() {
  local sub=$1
  shift
  local help
  # shellcheck disable=SC2086  # "bench gemm": two words
  help=$("$FS" $sub --help 2>&1) || { echo "fineserve $sub --help failed"; return 1; }
  local ok=0 a
  for a in "$@"; do
    if [[ $a == --* ]] && ! grep -q -- "${a%%=*}" <<<"$help"; then
      echo "fineserve $sub has no flag $a"
      ok=1
    fi
  done
  return "$ok"
}

# ---- the steps ------------------------------------------------------------------------------------
facts() {
  date -u +'date: %Y-%m-%dT%H:%M:%SZ'
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
  echo "host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB memory; $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}")"
  if command -v nvidia-smi >/dev/null; then nvidia-smi || true; nvidia-smi -q | head -60 || true; else echo "nvidia-smi: none"; fi
  nvcc --version | tail -2 || echo "nvcc: none"
  cmake --version | head -1
  g++ --version | head -1
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2
  command -v ncu >/dev/null && ncu --version | tail -1
  [[ -d $ROOT/.devkit ]] && echo "devkit: $(du -sh "$ROOT/.devkit" | cut -f1)"
  true
}

configure() {
  # -Xptxas -v: the build's log carries the ptxas report, so the ptxas step need not compile again.
  local args=(-S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFINESERVE_CUDA=ON "-DCMAKE_CUDA_FLAGS=-Xptxas -v")
  [[ -n ${CUDA_ARCHS:-} ]] && args+=("-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS")
  if command -v ccache >/dev/null; then
    args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  fi
  # An existing build tree (CI's) keeps its cache: reconfiguring with new flags would rebuild it all.
  if [[ -f $BUILD/CMakeCache.txt ]]; then
    echo "reusing $BUILD"
    cmake -S "$ROOT" -B "$BUILD"
  else
    cmake "${args[@]}"
  fi
  # NCCL is looked up only when the CUDA backend is on.
  grep -q '^FINESERVE_NCCL_LIBRARY:FILEPATH=/' "$BUILD/CMakeCache.txt" || { echo "$BUILD has no CUDA backend"; return 1; }
}

build() {
  cmake --build "$BUILD" -j "$JOBS" --target test_kernels test_models fineserve
}

# The table of every kernel, which fails on a spilling hot kernel. From the build's log when the
# build compiled the hot kernels' files with -Xptxas -v (a fresh GPU build); otherwise the device
# code of every .cu file is compiled again (-cubin: no host compile), one job per file and arch.
ptxas() {
  command -v nvcc >/dev/null || { echo "no nvcc: no ptxas report"; return 77; }
  python3 "$ROOT/scripts/ptxas_report.py" --self-test || return 1
  local build_log
  build_log=$(ls "$LOGS"/*-build.log 2>/dev/null | head -1)
  if [[ $DRY == 0 && -n $build_log ]] && grep -q "Compiling entry function.*gemv_kernel" "$build_log" &&
    grep -q "Compiling entry function.*attention_kernel" "$build_log"; then
    echo "from the build log: $(basename "$build_log")"
    python3 "$ROOT/scripts/ptxas_report.py" --hot "$HOT_KERNELS" --md "$OUT/ptxas.md" --tsv "$LOGS/ptxas.tsv" "$build_log"
    return
  fi
  local jobs=() f a
  for f in "$ROOT"/kernels/cuda/*.cu; do
    for a in $PTX_ARCHS; do jobs+=("$f $a"); done
  done
  export ROOT LOGS
  printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c \
    'nvcc -cubin -arch="$1" -std=c++20 --expt-relaxed-constexpr -lineinfo -Werror=all-warnings -Xptxas -v \
       -DFINESERVE_HAVE_CUDA=1 -I"$ROOT" "$0" -o /dev/null > "$LOGS/ptxas-$(basename "$0" .cu)-$1.txt" 2>&1 ||
       { echo "nvcc failed on $0 for $1:"; cat "$LOGS/ptxas-$(basename "$0" .cu)-$1.txt"; exit 1; }'
  local rc=$? specs=()
  for f in "$LOGS"/ptxas-*.txt; do specs+=("$(basename "$f" .txt | sed 's/^ptxas-//; s/-sm_.*//').cu=$f"); done
  python3 "$ROOT/scripts/ptxas_report.py" --hot "$HOT_KERNELS" --md "$OUT/ptxas.md" --tsv "$LOGS/ptxas.tsv" "${specs[@]}" || rc=1
  return "$rc"
}

ctest_gpu() {
  if [[ $DRY == 1 ]]; then
    local n
    n=$(ctest --test-dir "$BUILD" -N -R 'Cuda|Nccl' | grep -c 'Test *#')
    echo "would run: ctest --test-dir $BUILD -R 'Cuda|Nccl' ($n tests, FINESERVE_GPU_LARGE_TESTS=1)"
    ((n > 20)) || { echo "too few Cuda|Nccl tests: $n"; return 1; }
    return 77
  fi
  FINESERVE_GPU_LARGE_TESTS=1 ctest --test-dir "$BUILD" -R 'Cuda|Nccl' --output-on-failure -j 4 --timeout 240 \
    --output-junit "$LOGS/ctest-gpu.xml"
}

nccl() {
  local cmd=("$BUILD/tests/test_kernels" --gtest_filter='NcclCommunicator.*')
  if [[ $DRY == 1 ]]; then
    local n
    n=$("${cmd[@]}" --gtest_list_tests | grep -c '^  ')
    echo "would run: ${cmd[*]} ($n tests)"
    ((n >= 2)) || return 1
    return 77
  fi
  "${cmd[@]}"
}

sanitizer() {  # $1: memcheck, racecheck or initcheck
  local tool=$1 kernels=("$BUILD/tests/test_kernels" "--gtest_filter=$SAN_KERNELS")
  local models=("$BUILD/tests/test_models" "--gtest_filter=$SAN_MODELS")
  if [[ $DRY == 1 ]]; then
    local n1 n2
    n1=$("${kernels[@]}" --gtest_list_tests | grep -c '^  ')
    n2=$("${models[@]}" --gtest_list_tests | grep -c '^  ')
    echo "would run: compute-sanitizer --tool $tool on ${kernels[*]} ($n1 tests)"
    [[ $tool == memcheck ]] && echo "would run: compute-sanitizer --tool $tool on ${models[*]} ($n2 tests)"
    ((n1 == 3 && n2 == 1)) || { echo "the sanitizer filters match $n1 and $n2 tests, expected 3 and 1"; return 1; }
    return 77
  fi
  local bin
  bin=$(command -v compute-sanitizer || ls /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null) ||
    { echo "no compute-sanitizer"; return 1; }
  local san=("$bin" --tool "$tool" --error-exitcode 99 --print-limit 30)
  local rc=0
  "${san[@]}" "${kernels[@]}" || rc=1
  # The golden model (every op of a real forward pass) only under memcheck: the other tools are
  # slower, and the kernels they add checks for (shared memory, initialisation) are in the first run.
  if [[ $tool == memcheck ]]; then "${san[@]}" "${models[@]}" || rc=1; fi
  return "$rc"
}
memcheck() { sanitizer memcheck; }
racecheck() { sanitizer racecheck; }
initcheck() { sanitizer initcheck; }

bench_gemm() {
  if [[ $DRY == 1 ]]; then
    echo "would run: $FS ${GEMM_ARGS[*]}"
    check_cli "bench gemm" "${GEMM_ARGS[@]:2}" && return 77
    return 1
  fi
  "$FS" "${GEMM_ARGS[@]}"
}

bench_decode() {
  if [[ $DRY == 1 ]]; then
    echo "would run: $FS ${DECODE_ARGS[*]}"
    check_cli "bench decode" "${DECODE_ARGS[@]:2}" && return 77
    return 1
  fi
  "$FS" "${DECODE_ARGS[@]}"
}

# The same 20 concurrent greedy requests to `serve --device cuda` and `--device cpu` (cpu and cpu in
# a dry run: the checker itself is exercised), token for token.
serve() {
  local devices=(cuda cpu)
  [[ $DRY == 1 ]] && devices=(cpu cpu)
  local out=$OUT/serve_compare.json
  [[ $DRY == 1 ]] && out=$LOGS/serve_compare.json
  python3 "$ROOT/scripts/gpu_serve_compare.py" --fineserve "$FS" --model "$ROOT/tests/data/golden/opt-preln" \
    --devices "${devices[@]}" --requests 20 --log-dir "$LOGS" --out "$out"
}

decode_175b() {
  if [[ $DRY == 1 ]]; then
    echo "would run (on a GPU with more than 100 GB): $FS ${DECODE175_ARGS[*]}"
    check_cli "bench decode" "${DECODE175_ARGS[@]:2}" && return 77
    return 1
  fi
  ((BIG_GPU)) || { echo "the GPU has ${GPU_MEM_MIB} MiB: OPT-175B-wide decode needs more than 100 GB"; return 77; }
  "$FS" "${DECODE175_ARGS[@]}"
}

# ---- run --------------------------------------------------------------------------------------------
echo "gpu_check: $([[ $DRY == 1 ]] && echo dry run || echo "$GPU_NAME (cc $GPU_CC, $GPU_MEM_MIB MiB, driver $GPU_DRIVER)"), build $BUILD, $JOBS jobs, budget $BUDGET s"
step facts 30 facts
step configure 180 configure
step build 420 build
step ptxas 300 ptxas
step ctest 240 ctest_gpu
step nccl 60 nccl
step memcheck 120 memcheck
step racecheck 120 racecheck
step initcheck 90 initcheck
step bench-gemm 180 bench_gemm
step bench-decode 150 bench_decode
step serve 120 serve
step decode-175b 180 decode_175b

# ---- summary: the table, summary.md, summary.json, logs.tar.gz ----------------------------------
TOTAL=$((SECONDS - START))
{
  echo "# gpu_check $([[ $DRY == 1 ]] && echo "(dry run)")"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo "- GPU: ${GPU_NAME:-none} (compute capability ${GPU_CC:-n/a}, ${GPU_MEM_MIB} MiB, driver ${GPU_DRIVER:-n/a})"
  echo "- command: scripts/gpu_check.sh $([[ $DRY == 1 ]] && echo "--dry-run ")OUTDIR; build $BUILD; $JOBS jobs"
  echo
  echo "| step | status | seconds | note |"
  echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]//|//} |"
  done
  echo "| total | | $TOTAL | budget $BUDGET s |"
} >"$OUT/summary.md"
for i in "${!NAMES[@]}"; do
  printf '%s\t%s\t%s\t%s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
done >"$WORK/steps.tsv"
python3 - "$WORK/steps.tsv" "$OUT/summary.json" <<PY
import json, sys
steps = []
for line in open(sys.argv[1]):
    name, status, secs, note = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
    steps.append({"step": name, "status": status, "seconds": int(secs), "note": note})
json.dump({"dry_run": $DRY == 1, "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
           "commit": "$(git rev-parse HEAD 2>/dev/null)",
           "command": "scripts/gpu_check.sh $([[ $DRY == 1 ]] && echo "--dry-run ")OUTDIR",
           "gpu": {"name": "$GPU_NAME", "compute_capability": "$GPU_CC", "memory_mib": $GPU_MEM_MIB,
                   "driver": "$GPU_DRIVER"},
           "build_dir": "$BUILD", "jobs": $JOBS, "budget_s": $BUDGET, "total_s": $TOTAL,
           "steps": steps}, open(sys.argv[2], "w"), indent=1)
PY
cp "$OUT/summary.md" "$LOGS/"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
echo
cat "$OUT/summary.md"
echo
echo "outputs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
# Non-zero when a step failed or timed out (skips are fine): CI fails on a spilling hot kernel.
for s in "${STATUS[@]}"; do [[ $s == fail || $s == timeout ]] && exit 1; done
exit 0
