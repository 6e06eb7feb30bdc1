#!/usr/bin/env bash
# Perplexity of the default model (SmolLM2-135M-Instruct Q4_1 GGUF) served by FineServe from its
# exact import (`import-gguf`, Q4_1 blocks re-laid with offsets) and, for reference, from the fp16
# import, beside llama.cpp's llama-perplexity on the same GGUF file and the same text, over exactly
# the same scored tokens. A benchmark, never run by CI; llama.cpp is a peer, not a dependency.
#
# Usage: LLAMA_PERPLEXITY=/path/to/llama-perplexity scripts/ppl_vs_llama.sh CORPUS_DIR [OUT_JSON]
#   CORPUS_DIR holds kjv.txt and sotu.txt (as for scripts/ppl_table.sh: the last 40,000 bytes of each).
#
# llama-perplexity's strided mode widens its window to ctx + stride / 2 (and splits a batch larger
# than ctx into parallel sequences, which breaks that mode), so `-c 384 -b 384 --ppl-stride 256` is a
# 512-token window; the script checks the log says "Calculation chunk = 512".
# The same tokens: llama-perplexity (window 512) --ppl-stride 256 --chunks K scores tokens [256, 256 K + 256)
# (window i = [256 i, 256 i + 512) scores its last 256), every one with 256..511 tokens of context.
# `fineserve eval ppl --ctx 512 --stride 256 --max-tokens 256 K + 256` scores [1, 256 K + 256) with the
# same windows, and the same run limited to 256 tokens scores [1, 256) exactly as the first window
# does; the difference of their nll sums is the nll over llama.cpp's tokens. K is the most windows
# the text holds (its token count from llama.cpp's own tokenizer; the model does not add a BOS token),
# or CHUNKS when that is smaller.
set -euo pipefail
cd "$(dirname "$0")/.."

corpus=${1:?usage: LLAMA_PERPLEXITY=BIN scripts/ppl_vs_llama.sh CORPUS_DIR [OUT_JSON]}
out=${2:-docs/results/ppl_vs_llama_smollm2.json}
peer=${LLAMA_PERPLEXITY:?set LLAMA_PERPLEXITY to llama.cpp's llama-perplexity binary}
fineserve=${FINESERVE:-build/fineserve}
threads=${THREADS:-$(nproc)}
exact=$(bash scripts/fetch_default_model.sh "$fineserve" | tail -n 1)
dense=${exact%-q4_1}
gguf=models-cache/SmolLM2-135M-Instruct.Q4_1.gguf
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rows=()
for name in kjv sotu; do
  tail -c 40000 "$corpus/$name.txt" | iconv -f utf-8 -t utf-8 -c > "$work/$name.txt"
  # One window first, for the token count llama.cpp sees.
  "$peer" -m "$gguf" -f "$work/$name.txt" -c 384 -b 384 --ppl-stride 256 --chunks 1 -t "$threads" > "$work/count.log" 2>&1
  grep -q 'Calculation chunk = 512' "$work/count.log" || { echo "llama-perplexity did not use a 512-token window" >&2; exit 1; }
  n=$(grep -o 'have [0-9]* tokens' "$work/count.log" | head -n 1 | grep -o '[0-9]*')
  k=$(( (n - 512) / 256 + 1 ))
  (( 256 * k + 256 <= n )) || k=$(( k - 1 ))
  [[ -z ${CHUNKS:-} ]] || (( CHUNKS >= k )) || k=$CHUNKS  # fewer windows on a busy machine
  t0=$(date +%s.%N)
  "$peer" -m "$gguf" -f "$work/$name.txt" -c 384 -b 384 --ppl-stride 256 --chunks "$k" -t "$threads" > "$work/$name-llama.log" 2>&1
  t1=$(date +%s.%N)
  llama_ppl=$(grep -o '\[[0-9]*\][0-9.]*,' "$work/$name-llama.log" | tail -n 1 | sed 's/.*\]//; s/,//')
  for model in "$exact" "$dense"; do
    tag=$(basename "$model")
    "$fineserve" eval ppl --model "$model" --text "$work/$name.txt" --ctx 512 --stride 256 \
      --max-tokens $(( 256 * k + 256 )) --json "$work/$name-$tag-all.json" > /dev/null
    "$fineserve" eval ppl --model "$model" --text "$work/$name.txt" --ctx 512 --stride 512 \
      --max-tokens 256 --json "$work/$name-$tag-head.json" > /dev/null
  done
  rows+=("$name $n $k $llama_ppl $(echo "$t1 - $t0" | bc)")
done

python3 - "$out" "$work" "$exact" "$dense" "$gguf" "$peer" "$threads" "${rows[@]}" <<'PY'
import datetime, json, math, os, platform, subprocess, sys
out, work, exact, dense, gguf, peer, threads = sys.argv[1:8]
rows = [r.split() for r in sys.argv[8:]]
def ours(name, model):
    tag = os.path.basename(model)
    a = json.load(open(f"{work}/{name}-{tag}-all.json"))
    b = json.load(open(f"{work}/{name}-{tag}-head.json"))
    tokens = a["tokens"] - b["tokens"]
    return {"perplexity": math.exp((a["nll_sum"] - b["nll_sum"]) / tokens), "tokens": tokens,
            "quantization": a["quantization"], "seconds": a["seconds"] + b["seconds"]}
results = []
print(f"{'text':6} {'tokens':>7} {'llama.cpp':>10} {'FineServe exact':>16} {'diff':>8} {'FineServe fp16':>15}")
for name, n, k, llama_ppl, llama_s in rows:
    e, d = ours(name, exact), ours(name, dense)
    diff = e["perplexity"] / float(llama_ppl) - 1
    print(f"{name:6} {e['tokens']:7d} {float(llama_ppl):10.4f} {e['perplexity']:16.4f} {100 * diff:+7.2f}% {d['perplexity']:15.4f}")
    results.append({"text": name, "text_tokens": int(n), "windows": int(k), "scored_tokens": e["tokens"],
                    "llama_cpp_perplexity": float(llama_ppl), "llama_cpp_seconds": float(llama_s),
                    "fineserve_exact": e, "fineserve_fp16_import": d,
                    "exact_vs_llama_cpp": diff, "within_1_percent": abs(diff) <= 0.01})
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
doc = {"name": "ppl_vs_llama_smollm2", "device": cpu or platform.machine(),
       "date": datetime.date.today().isoformat(),
       "command": ("CHUNKS=" + os.environ["CHUNKS"] + " " if os.environ.get("CHUNKS") else "") + "LLAMA_PERPLEXITY=llama-perplexity scripts/ppl_vs_llama.sh CORPUS_DIR",
       "llama_cpp_args": "-c 384 -b 384 --ppl-stride 256 --chunks K (a 512-token window, stride 256)",
       "gguf": os.path.basename(gguf), "exact_checkpoint": os.path.basename(exact),
       "fp16_checkpoint": os.path.basename(dense), "ctx": 512, "stride": 256, "threads": int(threads),
       "method": "the same scored tokens on both sides: llama-perplexity (512-token window) --ppl-stride 256 --chunks K "
                 "scores tokens [256, 256K+256); FineServe's nll over [1, 256K+256) minus its nll over [1, 256)",
       "results": results}
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
json.dump(doc, open(out, "w"), indent=2)
print("wrote", out)
PY
