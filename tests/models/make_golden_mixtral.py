#!/usr/bin/env python3
"""Builds the golden fixture for the Mixtral (sparse MoE) tests with Hugging Face transformers.

Saves, under tests/data/golden/mixtral-moe/: config.json, model.safetensors (fp16, in the hub's
original layout: model.layers.N.block_sparse_moe.gate.weight [experts, hidden] and
block_sparse_moe.experts.E.{w1,w2,w3}.weight), the tokenizer of the Llama fixtures (copied from
tests/data/golden/llama-gqa), and golden.safetensors + golden.json as make_golden_llama.py writes
them: for fixed prompts, the prompt ids, the logits of every prompt position (fp32 from the fp16
weights) and the greedy continuation (16 tokens).

Experts run through transformers' "eager" experts implementation (the per-expert loop in
modeling_mixtral.py): its default "grouped_mm" differs from it by ~1e-4 relative on the CPU.

The model: MixtralForCausalLM, hidden 64, 2 layers, 4 query / 2 KV heads, 4 experts of
intermediate size 64, top-2 routing, untied LM head, rope_theta 1e6 (Mixtral's default).

Routing is a discontinuous function of the router logits: a token whose 2nd and 3rd expert
probabilities are nearly equal could pick another expert under a different summation order and
change its output entirely. The seed is therefore chosen so that, over every router call of the
logits and greedy runs, the gap between the k-th and (k+1)-th probability is at least MIN_GAP;
golden.json records that gap and how many tokens each expert received.

transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj [E, 2F, H], down_proj
[E, H, F]) and writes the original layout back on save_pretrained; this script writes the original
layout itself and checks it by loading it back with from_pretrained and comparing logits.

Usage: python tests/models/make_golden_mixtral.py [--out tests/data/golden]
Needs: torch, transformers, safetensors.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_golden_llama import NEW_TOKENS, PROMPTS  # noqa: E402  (the same prompts)

NAME = "mixtral-moe"
MIN_GAP = 1e-3


def make_mixtral(seed, tok):
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=128, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
                           attn_implementation="eager", experts_implementation="eager",
                           tie_word_embeddings=False)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # RMSNorm gains around 1, so that they are tested
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "experts" in n:  # fused expert tensors are not always covered by _init_weights
                p.copy_(0.1 * torch.randn_like(p))
            elif "gate" in n:  # the router: logits of a few units, so routing is decisive
                p.copy_(0.3 * torch.randn_like(p))
        # The weights the fixture stores, exactly. Parameters only: model.half() would also round
        # the rotary inv_freq buffer to fp16, which from_pretrained (and FineServe) compute in fp32.
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def original_layout(model):
    """The state dict in the hub's layout (block_sparse_moe, per-expert w1/w2/w3), fp16."""
    c = model.config
    out = {}
    for k, v in model.state_dict().items():
        v = v.half().contiguous()
        if ".mlp.experts.gate_up_proj" in k:
            base = k.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts.")
            for e in range(c.num_local_experts):
                out[f"{base}{e}.w1.weight"] = v[e, :c.intermediate_size].contiguous()
                out[f"{base}{e}.w3.weight"] = v[e, c.intermediate_size:].contiguous()
        elif ".mlp.experts.down_proj" in k:
            base = k.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts.")
            for e in range(c.num_local_experts):
                out[f"{base}{e}.w2.weight"] = v[e].contiguous()
        elif ".mlp.gate.weight" in k:
            out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
        else:
            assert ".mlp." not in k, k
            out[k] = v
    return out


def run(model, tok):
    """Logits and greedy continuations of PROMPTS, with the routing statistics of every call."""
    k = model.config.num_experts_per_tok
    stats = {"min_gap": 1.0, "tokens_per_expert": [0] * model.config.num_local_experts}

    def hook(_module, _inputs, output):
        probs = torch.softmax(output[0].float(), dim=-1).sort(dim=-1, descending=True).values
        stats["min_gap"] = min(stats["min_gap"], (probs[:, k - 1] - probs[:, k]).min().item())
        for e in output[2].flatten().tolist():
            stats["tokens_per_expert"][e] += 1

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    results = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text)["input_ids"]
            x = torch.tensor([ids])
            logits = model(x).logits[0].float()
            seq = x  # plain greedy argmax, EOS included (`--ignore-eos`), no KV cache
            for _ in range(NEW_TOKENS):
                nxt = model(seq).logits[0, -1].argmax().view(1, 1)
                seq = torch.cat([seq, nxt], dim=1)
            results.append((text, ids, logits, seq[0, len(ids):].tolist()))
    for h in handles:
        h.remove()
    return results, stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "golden"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok_dir = os.path.join(args.out, "llama-gqa")
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)

    for seed in range(47, 100):
        model = make_mixtral(seed, tok)
        results, stats = run(model, tok)
        print(f"seed {seed}: min routing gap {stats['min_gap']:.2e}, tokens per expert {stats['tokens_per_expert']}")
        if stats["min_gap"] >= MIN_GAP and min(stats["tokens_per_expert"]) > 0:
            break
    else:
        raise SystemExit("no seed gives a decisive routing")

    out = os.path.join(args.out, NAME)
    os.makedirs(out, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tok_dir, f), os.path.join(out, f))
    model.config.torch_dtype = "float16"
    model.config.to_json_file(os.path.join(out, "config.json"))
    save_file(original_layout(model), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    # The layout written above is what transformers itself loads.
    reloaded = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager").eval()
    with torch.no_grad():
        x = torch.tensor([results[0][1]])
        assert torch.equal(reloaded(x).logits, model(x).logits), "original-layout round trip differs"

    tensors, meta = {}, {"prompts": [], "routing": {"seed": seed, "min_gap": stats["min_gap"],
                                                    "tokens_per_expert": stats["tokens_per_expert"]}}
    for i, (text, ids, logits, gen) in enumerate(results):
        tensors[f"logits.{i}"] = logits.contiguous()
        meta["prompts"].append({"text": text, "ids": ids, "greedy": gen})
    save_file(tensors, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(NAME, "params:", sum(p.numel() for p in model.parameters()), "prompt tokens:",
          [len(p["ids"]) for p in meta["prompts"]])


if __name__ == "__main__":
    main()
