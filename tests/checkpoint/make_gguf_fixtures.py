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
tests/data/gguf/tiny-llama-spm.gguf
    The same model (F16 matrices) with the SentencePiece vocabulary of tests/data/spm (a Llama-style
    BPE tokenizer.model with byte fallback, and its tokenizer_config.json) written as
    convert_hf_to_gguf.py writes one (_set_vocab_sentencepiece): tokenizer.ggml.model "llama", every
    piece's text, score and type read through the sentencepiece library, the added tokens of
    tokenizer_config.json as CONTROL (special) or USER_DEFINED pieces, and bos / eos / unk ids and
    add_bos_token / add_eos_token by gguf-py's SpecialVocab; plus a Llama 2 chat template.

Usage: python tests/checkpoint/make_gguf_fixtures.py [FILE.gguf ...]   (default: all)
       (needs: gguf, numpy, safetensors, sentencepiece)
"""
import json
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFWriter, SpecialVocab, quants
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")
OUT = os.path.join(DATA, "gguf")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
LLAMA2_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + "
                        "' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
# llama.cpp's llama_token_type, which numbers piece types as sentencepiece_model.proto does.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


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


def spm_vocab(spm_dir, vocab_size):
    """The (tokens, scores, types) convert_hf_to_gguf.py's _create_vocab_sentencepiece writes for a
    model folder with a SentencePiece tokenizer.model: ids past the model's pieces are UNUSED
    "[PADn]" placeholders; tokenizer_config.json's added tokens overwrite their ids, as CONTROL when
    special (or looking like <...>), USER_DEFINED otherwise (with '▁' written as ' ')."""
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor()
    sp.LoadFromFile(os.path.join(spm_dir, "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    config = json.load(open(os.path.join(spm_dir, "tokenizer_config.json")))
    for key, data in config.get("added_tokens_decoder", {}).items():
        i, content = int(key), data["content"]
        if i >= vocab_size:
            continue
        looks_special = content.startswith("<") and content.endswith(">")
        if data.get("special") or looks_special:
            types[i] = CONTROL
        else:
            content = content.replace("\u2581", " ")
            types[i] = USER_DEFINED
        tokens[i], scores[i] = content, -1000.0
    return tokens, scores, types


def write_tiny_llama(path, quantized=False, spm=False):
    src = os.path.join(DATA, "golden", "llama-gqa")
    cfg = json.load(open(os.path.join(src, "config.json")))
    tok = json.load(open(os.path.join(src, "tokenizer.json")))
    state = load_file(os.path.join(src, "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = GGUFWriter(path, "llama")
    w.add_name("tiny llama-gqa spm" if spm else "tiny llama-gqa")
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

    if spm:
        spm_dir = os.path.join(DATA, "spm")
        tokens, scores, types = spm_vocab(spm_dir, cfg["vocab_size"])
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        SpecialVocab(spm_dir, n_vocab=len(tokens)).add_to_gguf(w)
        w.add_chat_template(LLAMA2_CHAT_TEMPLATE)
    else:
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
    writers = {
        "dequant.gguf": write_dequant,
        "tiny-llama.gguf": write_tiny_llama,
        "tiny-llama-q.gguf": lambda path: write_tiny_llama(path, quantized=True),
        "tiny-llama-spm.gguf": lambda path: write_tiny_llama(path, spm=True),
    }
    names = sys.argv[1:] or list(writers)
    for name in names:
        writers[name](os.path.join(OUT, name))
        print(name, os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    main()
