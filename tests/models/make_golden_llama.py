#!/usr/bin/env python3
"""Builds the golden fixtures for the Llama / Mistral tests with Hugging Face transformers.

For each tiny random model it saves, under tests/data/golden/<name>/:
  config.json, model.safetensors (fp16), tokenizer.json, tokenizer_config.json, and
  golden.safetensors + golden.json holding, for fixed prompts, the prompt ids, the logits of every
  prompt position (computed in fp32 from the fp16 weights) and the greedy continuation (16 tokens).

The fixtures (each exercising different config fields):
  llama-gqa          LlamaForCausalLM, 4 query / 2 KV heads, untied LM head, rope_theta 10000
  llama-rope3-bias   Llama-3.1 rope scaling ("llama3"), attention and MLP biases, tied LM head,
                     an explicit head_dim (heads * head_dim != hidden_size), gelu_pytorch_tanh
  mistral-swa        MistralForCausalLM, one KV head, sliding window of 5 positions

The tokenizer is a small byte-level BPE (512 tokens) trained on the King James Bible, saved as a
tokenizer.json whose post-processor prepends <s> (the Llama 3 / SmolLM layout).

Usage: python tests/models/make_golden_llama.py --corpus PATH/kjv.txt [--out tests/data/golden]
Needs: torch, transformers, tokenizers, safetensors.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast)

PROMPTS = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD said unto Moses,",
    "Hello world! 123 numbers, ünïcödé and   spaces.",
]
NEW_TOKENS = 16
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "clean_up_tokenization_spaces": False}


def train_tokenizer(corpus, out_dir):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with open(corpus, encoding="utf-8") as f:
        lines = f.read().splitlines()[:20000]
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=1)
    hf = PreTrainedTokenizerFast.from_pretrained(out_dir)
    assert hf("Hi")["input_ids"][0] == 1, "the post-processor prepends <s>"
    return hf


def randomize(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # RMSNorm gains around 1, so that they are tested
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        # The weights the fixture stores, exactly. Parameters only: model.half() would also round
        # the rotary inv_freq buffers to fp16, which the fixture does not store and FineServe
        # computes in full precision.
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def make_llama(seed, tok, **cfg):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.1, attn_implementation="eager", **cfg)
    return randomize(LlamaForCausalLM(config).eval())


def make_mistral(seed, tok, **cfg):
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                           initializer_range=0.1, attn_implementation="eager", **cfg)
    return randomize(MistralForCausalLM(config).eval())


def save(name, model, tok, out_root, tok_dir):
    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tok_dir, f), "rb") as src, open(os.path.join(out, f), "wb") as dst:
            dst.write(src.read())
    model.config.torch_dtype = "float16"
    model.config.to_json_file(os.path.join(out, "config.json"))
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    tensors, meta = {}, {"prompts": []}
    for i, text in enumerate(PROMPTS):
        ids = tok(text)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0].float()
            # Plain greedy argmax for NEW_TOKENS steps, EOS included (`--ignore-eos`).
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
    print(name, "params:", sum(p.numel() for p in model.parameters()), "prompt tokens:",
          [len(p["ids"]) for p in meta["prompts"]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "golden"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok_dir = os.path.join(args.out, "_tokenizer_llama")
    os.makedirs(tok_dir, exist_ok=True)
    tok = train_tokenizer(args.corpus, tok_dir)
    save("llama-gqa", make_llama(11, tok, num_key_value_heads=2, tie_word_embeddings=False), tok, args.out, tok_dir)
    rope3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    save("llama-rope3-bias", make_llama(12, tok, num_key_value_heads=2, head_dim=32, attention_bias=True,
                                        mlp_bias=True, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                                        rope_parameters=rope3), tok, args.out, tok_dir)
    save("mistral-swa", make_mistral(13, tok, num_key_value_heads=1, sliding_window=5), tok, args.out, tok_dir)
    for f in os.listdir(tok_dir):
        os.remove(os.path.join(tok_dir, f))
    os.rmdir(tok_dir)


if __name__ == "__main__":
    main()
