#!/usr/bin/env python3
"""Builds the golden fixtures for the OPT tests with Hugging Face transformers.

For each tiny random OPT model it saves, under tests/data/golden/<name>/:
  config.json, model.safetensors (fp16), vocab.json, merges.txt, tokenizer_config.json,
  special_tokens_map.json, and golden.safetensors + golden.json holding, for fixed prompts,
  the prompt ids, the logits of every prompt position (computed in fp32 from the fp16 weights)
  and the greedy continuation (16 tokens).

The tokenizer is a small byte-level BPE (1000 tokens) trained on the King James Bible so that
the models' embeddings stay small; it uses OPT's conventions (</s> is BOS and EOS, prepended).

Usage: python tests/models/make_golden.py --corpus PATH/kjv.txt [--out tests/data/golden]
Needs: torch, transformers, tokenizers, safetensors.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

PROMPTS = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD said unto Moses,",
    "Hello world! 123 numbers, ünïcödé and   spaces.",
]
NEW_TOKENS = 16
TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "add_prefix_space": False,
                    "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                    "errors": "replace"}


def train_tokenizer(corpus, out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(corpus, encoding="utf-8") as f:
        lines = f.read().splitlines()[:20000]
    tok.train_from_iterator(lines, trainer)
    tok.model.save(out_dir)  # vocab.json + merges.txt
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=1)
    hf = AutoTokenizer.from_pretrained(out_dir)
    assert hf("Hi")["input_ids"][0] == 2, "the OPT convention prepends </s>"
    return hf


def make_model(name, tok, seed, outliers=False, **cfg):
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=1, bos_token_id=2,
                       eos_token_id=2, init_std=0.1, **cfg)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        # Give norms and biases non-trivial values so that they are tested too.
        for n, p in model.named_parameters():
            if "layer_norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        if outliers:
            # Planted outlier input channels in one matrix: the adaptive quantizer must refine it.
            w = model.model.decoder.layers[1].fc1.weight
            w[:, [3, 77]] *= 25.0
    model = model.half().float()  # the weights the fixture stores, exactly
    return model


def save(name, model, tok, out_root, tok_dir):
    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    # The OPT layout: vocab.json + merges.txt + tokenizer_config.json with add_bos_token.
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(out, f))
    model.config.torch_dtype = "float16"
    model.config.to_json_file(os.path.join(out, "config.json"))
    state = {k: v.half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    tensors, meta = {}, {"prompts": []}
    for i, text in enumerate(PROMPTS):
        ids = tok(text)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0].float()
            # Plain greedy argmax for NEW_TOKENS steps, EOS included (generate()'s min_new_tokens
            # would mask EOS instead, which `fineserve generate --ignore-eos` does not do).
            seq = x
            for _ in range(NEW_TOKENS):
                nxt = model(seq).logits[0, -1].argmax().view(1, 1)
                seq = torch.cat([seq, nxt], dim=1)
            gen = seq[0, len(ids):].tolist()
        tensors[f"logits.{i}"] = logits.contiguous()
        meta["prompts"].append({"text": text, "ids": ids, "greedy": gen})
    save_file(tensors, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(name, "params:", sum(p.numel() for p in model.parameters()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "golden"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok_dir = os.path.join(args.out, "_tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    tok = train_tokenizer(args.corpus, tok_dir)
    save("opt-preln", make_model("opt-preln", tok, 1, hidden_size=128, num_hidden_layers=2, ffn_dim=512,
                                  num_attention_heads=4, do_layer_norm_before=True), tok, args.out, tok_dir)
    save("opt-postln-proj", make_model("opt-postln-proj", tok, 2, hidden_size=128, word_embed_proj_dim=64,
                                        num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                                        do_layer_norm_before=False), tok, args.out, tok_dir)
    save("opt-outliers", make_model("opt-outliers", tok, 3, outliers=True, hidden_size=128, num_hidden_layers=2,
                                     ffn_dim=512, num_attention_heads=4, do_layer_norm_before=True), tok, args.out, tok_dir)
    for f in os.listdir(tok_dir):
        os.remove(os.path.join(tok_dir, f))
    os.rmdir(tok_dir)


if __name__ == "__main__":
    main()
