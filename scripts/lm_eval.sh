#!/usr/bin/env bash
# lm-evaluation-harness (`lm-eval` from PyPI) against a live `fineserve serve`, through its
# `local-completions` model (the OpenAI completions API with echo + logprobs), on two tiny tasks
# from local files in tests/python/lm_eval_tasks (no dataset download): one loglikelihood
# multiple-choice task and one generate_until task. Runs the evaluation twice and fails unless
# both complete and give identical scores and identical per-document responses.
#
#   scripts/lm_eval.sh [FINESERVE_BINARY] [MODEL_DIR] [WORK_DIR]
#   (defaults: build-cpu/fineserve, tests/data/golden/opt-preln, build-cpu/lm_eval)
#
# ctest runs it (label `harness`). The virtual environment lives in WORK_DIR/venv (reused):
# lm-eval 0.4 needs no torch for API models; transformers is there for the tokenizer lm-eval
# counts context tokens with (the checkpoint's own tokenizer files). About 1 GB, most of it
# pyarrow, pandas, scipy and scikit-learn that lm-eval's core imports. Exits 77 (ctest: skipped)
# only when that environment cannot be made (offline); $FS_PYTHON makes it (default python3).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-$root/build-cpu/fineserve}
model=$(cd "${2:-$root/tests/data/golden/opt-preln}" && pwd)
work=${3:-$root/build-cpu/lm_eval}
source "$root/scripts/live_server.sh"
mkdir -p "$work"
work=$(cd "$work" && pwd)
venv=$work/venv
fs_venv "$venv" "import lm_eval, transformers, aiohttp, tenacity" \
  lm-eval==0.4.13 transformers requests aiohttp tenacity || exit $?

fs_start_server "$work/server.log" "$binary" --model "$model" --served-model-name fineserve-lm-eval || exit 1

# One request at a time (num_concurrent=1): the check is that the same requests give the same
# answers, so the batches they share on the server stay the same too.
run() {
  rm -rf "$work/out_$1"
  (cd "$root/tests/python/lm_eval_tasks" &&
    HF_HOME=$work/hf HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$venv/bin/lm_eval" \
      --model local-completions \
      --model_args "model=fineserve-lm-eval,base_url=$FS_URL/v1/completions,tokenizer=$model,tokenizer_backend=huggingface,num_concurrent=1,max_retries=1" \
      --include_path . --tasks fineserve_mc,fineserve_gen --seed 0 --log_samples --output_path "$work/out_$1") \
    >"$work/run_$1.log" 2>&1 || { echo "lm_eval run $1 failed:"; tail -40 "$work/run_$1.log"; return 1; }
  # The results table without its last column (Stderr's value), and every document's responses.
  grep -E '^\|' "$work/run_$1.log" >"$work/table_$1.txt"
  "$venv/bin/python" - "$work/out_$1" >"$work/responses_$1.txt" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/**/samples_*.jsonl", recursive=True)):
    task = path.rsplit("samples_", 1)[1].rsplit("_", 1)[0]
    for line in open(path):
        s = json.loads(line)
        print(task, s["doc_id"], json.dumps(s["resps"]))
PY
}
status=0
echo "== run 1"; run 1 || status=1
[ $status -eq 0 ] && cat "$work/table_1.txt"
echo "== run 2"; [ $status -eq 0 ] && { run 2 || status=1; }
if [ $status -eq 0 ]; then
  if ! grep -q fineserve_mc "$work/table_1.txt" || ! grep -q fineserve_gen "$work/table_1.txt"; then
    echo "lm-eval printed no scores:"; tail -40 "$work/run_1.log"; status=1
  elif [ "$(wc -l <"$work/responses_1.txt")" -ne 10 ]; then
    echo "expected the responses to 10 documents (6 questions, 4 prompts), got:"; cat "$work/responses_1.txt"; status=1
  elif diff -u "$work/table_1.txt" "$work/table_2.txt" && diff -u "$work/responses_1.txt" "$work/responses_2.txt"; then
    echo "identical scores and responses on both runs"
  else
    echo "the two runs differ"; status=1
  fi
fi
fs_stop_server || status=1
exit $status
