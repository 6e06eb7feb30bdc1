#!/usr/bin/env bash
# lm-evaluation-harness (`lm-eval` from PyPI) against a live `fineserve serve`, through its
# `local-completions` model (the OpenAI completions API with echo + logprobs), on two tiny tasks
# defined here from local files (no dataset download): one loglikelihood multiple-choice task and
# one generate_until task. Runs the evaluation twice and fails unless the scores are identical.
#
#   scripts/lm_eval.sh [FINESERVE_BINARY] [MODEL_DIR] [WORK_DIR]
#   (defaults: build-cpu/fineserve, tests/data/golden/opt-preln, build-cpu/lm_eval)
#
# The virtual environment lives in WORK_DIR/venv (reused). lm-eval 0.4.x does not need torch for
# API models; transformers is installed for the tokenizer lm-eval uses to count context tokens
# (the checkpoint's own tokenizer files). Not run by CI: the environment is about 1 GB.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-$here/build-cpu/fineserve}
model=${2:-$here/tests/data/golden/opt-preln}
work=${3:-$here/build-cpu/lm_eval}
mkdir -p "$work/tasks"
venv=$work/venv
if ! "$venv/bin/python" -c "import lm_eval, transformers" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --disable-pip-version-check --quiet lm-eval transformers requests aiohttp tenacity
fi

# The tasks: a handful of documents each, in JSON lines.
cat > "$work/tasks/mc.jsonl" <<'JSONL'
{"question": "In the beginning God created the heaven and the", "choices": ["earth", "river", "table", "seven"], "label": 0}
{"question": "And God said, Let there be", "choices": ["light", "salt", "wheels", "Tuesday"], "label": 0}
{"question": "And the evening and the morning were the first", "choices": ["day", "horse", "copper", "song"], "label": 0}
{"question": "And God called the light Day, and the darkness he called", "choices": ["Night", "Stone", "Bread", "Gold"], "label": 0}
{"question": "The number after two is", "choices": ["three", "green", "under", "salt"], "label": 0}
{"question": "Water that falls from clouds is called", "choices": ["rain", "iron", "bread", "wool"], "label": 0}
JSONL
cat > "$work/tasks/gen.jsonl" <<'JSONL'
{"prompt": "In the beginning God created", "answer": " the heaven"}
{"prompt": "And God said, Let there be light: and there was", "answer": " light"}
{"prompt": "And the earth was without form, and", "answer": " void"}
{"prompt": "And God saw the light, that it was", "answer": " good"}
JSONL
cat > "$work/tasks/fineserve_mc.yaml" <<YAML
task: fineserve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: $work/tasks/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
YAML
cat > "$work/tasks/fineserve_gen.yaml" <<YAML
task: fineserve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: $work/tasks/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
generation_kwargs:
  until: ["\n", "."]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
YAML

log=$work/server.log
"$binary" serve --model "$model" --port 0 --served-model-name fineserve-lm-eval >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
port=""
for _ in $(seq 600); do
  port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "the server exited:"; cat "$log"; exit 1; }
  sleep 0.1
done

run() {
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$venv/bin/lm_eval" --model local-completions \
    --model_args "model=fineserve-lm-eval,base_url=http://127.0.0.1:$port/v1/completions,tokenizer=$model,tokenizer_backend=huggingface,num_concurrent=2,max_retries=1" \
    --include_path "$work/tasks" --tasks fineserve_mc,fineserve_gen --seed 0 --output_path "$work/out_$1" 2>&1 |
    tee "$work/run_$1.log" | grep -E '^\|' | sed 's/|[^|]*$/|/'
}
echo "== run 1"; run 1 > "$work/table_1.txt"; cat "$work/table_1.txt"
echo "== run 2"; run 2 > "$work/table_2.txt"; cat "$work/table_2.txt"
grep -q fineserve_mc "$work/table_1.txt" || { echo "lm-eval produced no scores:"; tail -40 "$work/run_1.log"; exit 1; }
if diff -u "$work/table_1.txt" "$work/table_2.txt"; then echo "identical scores on both runs"; else echo "the scores differ"; exit 1; fi
