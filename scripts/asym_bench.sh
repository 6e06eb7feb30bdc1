#!/usr/bin/env bash
# Decode and prefill tokens/s of symmetric vs asymmetric int4 g32 on the default model, at batch 1
# and 8 (`fineserve bench model`), on the CPU. A benchmark, never run by CI.
#
# The two subjects differ only in the offsets: the asymmetric one is the exact import of the
# default GGUF (Q4_1 blocks as int4 g32 codes + scales + offsets, the Q8_0 embedding / tied head as
# int8 g32); the symmetric one is the same checkpoint with every `.offsets` tensor removed (same
# codes, same scales, same bytes otherwise; its weights are wrong, only its speed is meaningful).
#
# Usage: scripts/asym_bench.sh [OUT_JSON]   (needs build/fineserve, or FINESERVE=..., and a Python
#        with the safetensors and numpy packages as $PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/results/asym_smollm2_cpu.json}
fineserve=${FINESERVE:-build/fineserve}
python=${PYTHON:-python3}
exact=$(bash scripts/fetch_default_model.sh "$fineserve" | tail -n 1)
sym=${exact}-no-offsets

if [[ ! -f $sym/config.json ]]; then
  rm -rf "$sym.part"
  mkdir -p "$sym.part"
  "$python" - "$exact" "$sym.part" <<'PY'
import glob, os, shutil, sys
from safetensors import safe_open
from safetensors.numpy import save_file
src, dst = sys.argv[1:3]
for f in os.listdir(src):
    if not f.endswith(".safetensors") and os.path.isfile(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), dst)
for path in glob.glob(os.path.join(src, "*.safetensors")):
    with safe_open(path, "np") as s:
        tensors = {k: s.get_tensor(k) for k in s.keys() if not k.endswith(".offsets")}
        save_file(tensors, os.path.join(dst, os.path.basename(path)), metadata=s.metadata())
PY
  mv "$sym.part" "$sym"
fi

"$fineserve" bench model --model "$sym" --label "int4-g32-symmetric" --model "$exact" --label "int4-g32-asymmetric" \
  --batch 1 --batch 8 --prompt-tokens "${PROMPT_TOKENS:-128}" --new-tokens "${NEW_TOKENS:-32}" \
  --rounds "${ROUNDS:-3}" --reps "${REPS:-3}" --out "$out"
