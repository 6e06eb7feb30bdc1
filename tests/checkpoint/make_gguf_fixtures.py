#!/usr/bin/env python3
"""Writes the GGUF test fixtures with llama.cpp's own Python package (gguf-py).

tests/data/gguf/dequant.gguf
    One tensor per ggml type FineServe dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    Q4_K, Q5_K, Q6_K), of awkward shapes, each followed by "<name>.expected": the F32 values gguf-py's
    dequantize() gives for it. The legacy types are quantized from random values; the K-quants are
    random blocks (gguf-py cannot quantize them) with sane fp16 scales.
tests/data/gguf/tiny-llama.gguf
    tests/data/golden/llama-gqa converted as llama.cpp's convert_hf_to_gguf.py converts a Llama:
    llama.* metadata, q/k rows permuted for ggml's rotary layout, F16 matrices and F32 norms, and the
    byte-level BPE tokenizer (tokens, token types, merges, bos/eos, add_bos_token, a chat template).
    Importing it must give back the fixture's tensors exactly.
tests/data/gguf/tiny-llama-q.gguf
    The same model with its matrices quantized by gguf-py (quants.quantize): Q4_1, Q4_0 and Q8_0
    (what `import-gguf` re-lays exactly, q/k rows permuted before quantizing as llama.cpp does) and
    one Q5_0 matrix (re-quantized, with a warning), token_embd Q8_0, output Q4_1, norms F32.

Usage: python tests/checkpoint/make_gguf_fixtures.py   (needs: gguf, numpy, safetensors)
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFWriter, quants
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
OUT = os.path.join(DATA, "gguf")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def random_blocks(rng, qtype, rows, block_bytes, scale_offsets):
    """Random K-quant blocks whose fp16 scales (at scale_offsets) are small finite values."""
    n_blocks = rows
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in scale_offsets:
        d = rng.uniform(0.001, 0.05, size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        raw[:, off:off + 2] = d
    return raw


def write_dequant(path):
    rng = np.random.default_rng(7)
    w = GGUFWriter(path, "test")
    legacy = [("f32", T.F32, (3, 33)), ("f16", T.F16, (2, 40)), ("bf16", T.BF16, (3, 7)),
              ("q8_0", T.Q8_0, (3, 64)), ("q4_0", T.Q4_0, (5, 32)), ("q4_1", T.Q4_1, (2, 96)),
              ("q5_0", T.Q5_0, (3, 64)), ("q5_1", T.Q5_1, (1, 160))]
    for name, qtype, shape in legacy:
        x = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        x[0, 1] = 7.5  # an outlier, so that a block's scale is not typical
        if qtype == T.F32:
            w.add_tensor(name, x)
            expected = x
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
            expected = x.astype(np.float16).astype(np.float32)
        else:
            q = quants.quantize(x, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            expected = quants.dequantize(q, qtype)
        w.add_tensor(name + ".expected", expected.astype(np.float32))
    # K-quants: (block bytes, offsets of the fp16 scales in a block)
    kquants = [("q4_k", T.Q4_K, 144, [0, 2]), ("q5_k", T.Q5_K, 176, [0, 2]), ("q6_k", T.Q6_K, 210, [208])]
    for name, qtype, nbytes, offsets in kquants:
        rows = 2
        q = random_blocks(rng, qtype, rows, nbytes, offsets)  # one 256-element block per row
        w.add_tensor(name, q, raw_dtype=qtype)
        w.add_tensor(name + ".expected", quants.dequantize(q, qtype).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows reordered for ggml's rotary."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_llama(path, quantized=False):
    src = os.path.join(DATA, "golden", "llama-gqa")
    cfg = json.load(open(os.path.join(src, "config.json")))
    tok = json.load(open(os.path.join(src, "tokenizer.json")))
    state = load_file(os.path.join(src, "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = GGUFWriter(path, "llama")
    w.add_name("tiny llama-gqa")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(3 if quantized else 1)  # mostly Q4_1, or mostly F16

    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf_name, data in state.items():
        data = data.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, heads, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, heads, kv_heads)
        qtype = qtype_for(hf_name) if quantized and data.ndim == 2 else None
        if qtype is not None:
            w.add_tensor(names[hf_name], quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            # llama.cpp keeps 1-D tensors (norms) in F32 and stores matrices as F16.
            w.add_tensor(names[hf_name], data if data.ndim == 1 else data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def qtype_for(hf_name):
    """The quantized fixture's type per matrix: every exact type on several shapes, one re-quantized."""
    if hf_name == "model.embed_tokens.weight":
        return T.Q8_0
    if hf_name == "model.layers.1.mlp.up_proj.weight":
        return T.Q5_0
    for part, qtype in (("q_proj", T.Q4_1), ("k_proj", T.Q4_0), ("v_proj", T.Q8_0), ("o_proj", T.Q4_1),
                        ("gate_proj", T.Q4_1), ("up_proj", T.Q4_0), ("down_proj", T.Q8_0), ("lm_head", T.Q4_1)):
        if part in hf_name:
            return qtype
    return None


def main():
    os.makedirs(OUT, exist_ok=True)
    write_dequant(os.path.join(OUT, "dequant.gguf"))
    write_tiny_llama(os.path.join(OUT, "tiny-llama.gguf"))
    write_tiny_llama(os.path.join(OUT, "tiny-llama-q.gguf"), quantized=True)
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)), "bytes")


if __name__ == "__main__":
    main()
