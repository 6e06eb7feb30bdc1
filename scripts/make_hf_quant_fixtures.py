#!/usr/bin/env python3
"""Builds the Hugging Face quantized-checkpoint fixtures under tests/data/hf_quant/ (not run in CI).

Every fixture is a tiny random Llama or Qwen2 model (hidden 64, 2 layers, vocabulary 512) quantized
and packed by the package that defines its format, never by FineServe's writer:

  ct-*     compressed-tensors `pack-quantized`: llmcompressor's oneshot QuantizationModifier
           (round-to-nearest, data-free) saved with save_compressed=True  [--which ct]
  gptq-*   GPTQ: gptqmodel's GPTQ quantizer on CPU with a small calibration set  [--which gptq]
  awq-*    AWQ GEMM: AutoAWQ's WQLinear_GEMM.from_linear packing on scales / zero points chosen
           here with AutoAWQ's own round-to-nearest rule (AutoAWQ's search needs a GPU)  [--which awq]
  qwen2-*  dense Qwen2 golden fixtures (tied and untied embeddings)  [--which qwen2]

Each fixture directory holds config.json, model.safetensors (or shards with an index), and
golden.json + golden.safetensors: per prompt its ids, the fp32 logits of every position and 8
greedy tokens. The expected model is transformers' model of the same config whose quantized
linear weights are the format package's own dequantization of the saved tensors, done in fp32
(so the reference does not round w = s·(q − z) to fp16), all other tensors as saved.

The packages conflict on torch versions, so each --which runs in its own virtual environment:
  ct, qwen2:  pip install torch transformers safetensors compressed-tensors llmcompressor
  gptq:       pip install gptqmodel
  awq:        pip install torch transformers safetensors; pip download --no-deps autoawq and pass
              --awq-src DIR (the unpacked sdist; only awq/modules and awq/utils are imported)

Usage: python scripts/make_hf_quant_fixtures.py --which ct [--out tests/data/hf_quant]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

PROMPTS = [[1, 43, 80, 261, 300, 73, 267, 80, 293, 394], [1, 297, 261, 324, 384, 321, 416]]
NEW_TOKENS = 8
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_model(arch, seed, tied, hidden=64, intermediate=128, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, initializer_range=0.1, tie_word_embeddings=tied, **extra)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def save_dense(model, out):
    os.makedirs(out, exist_ok=True)
    model.config.torch_dtype = "float16"
    model.save_pretrained(out, safe_serialization=True)
    for f in os.listdir(out):
        if f == "generation_config.json":
            os.remove(os.path.join(out, f))


def read_state(out):
    state = {}
    index = os.path.join(out, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    for f in files:
        state.update(load_file(os.path.join(out, f)))
    return state


def write_golden(reference, out, note):
    """Logits and greedy tokens of `reference` (an fp32 transformers model) for PROMPTS."""
    tensors, meta = {}, {"reference": note, "prompts": []}
    with torch.no_grad():
        for i, ids in enumerate(PROMPTS):
            x = torch.tensor([ids])
            tensors[f"logits.{i}"] = reference(x).logits[0].float().contiguous()
            seq = x
            for _ in range(NEW_TOKENS):
                nxt = reference(seq).logits[0, -1].argmax().view(1, 1)
                seq = torch.cat([seq, nxt], dim=1)
            meta["prompts"].append({"text": "", "ids": ids, "greedy": seq[0, len(ids):].tolist()})
    save_file(tensors, os.path.join(out, "golden.safetensors"))
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(meta, f, indent=1)


def reference_model(out, dequantized):
    """transformers' fp32 model of the checkpoint's config: dense tensors as saved, the linear
    weights `dequantized` ({module stem: fp32 [out, in]})."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(out)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    state = read_state(out)
    own = model.state_dict()
    with torch.no_grad():
        for name, p in own.items():
            stem = name[: -len(".weight")] if name.endswith(".weight") else None
            if stem in dequantized:
                p.copy_(dequantized[stem].float())
            elif name in state:
                p.copy_(state[name].float())
            elif name == "lm_head.weight" and config.tie_word_embeddings:
                p.copy_(state["model.embed_tokens.weight"].float())
            else:
                raise SystemExit(f"{out}: no tensor for {name}")
    return model


def fixture_dir(root, name):
    out = os.path.join(root, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    return out


# ---- compressed-tensors (llmcompressor) --------------------------------------------------------

def make_ct(root, name, arch, seed, tied, bits, group, symmetric, shard=None, dtype=torch.float16):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = make_model(arch, seed, tied).to(dtype)  # bf16: the scales are saved in bf16 too
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "strategy": "channel" if group is None else "group"}
    if group is not None:
        weights["group_size"] = group
    recipe = QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                  ignore=["lm_head"])
    tmp = tempfile.mkdtemp()  # oneshot wants a model that was loaded from somewhere
    model.save_pretrained(tmp)
    model.config._name_or_path = tmp
    model.name_or_path = tmp
    oneshot(model=model, recipe=recipe)
    out = fixture_dir(root, name)
    if shard:  # sharded, with a model.safetensors.index.json
        model.save_pretrained(out, save_compressed=True, max_shard_size=shard)
    else:
        model.save_pretrained(out, save_compressed=True)
    shutil.rmtree(tmp)
    for f in ("generation_config.json", "recipe.yaml"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))

    args = QuantizationArgs(**weights)
    state = read_state(out)
    deq = {}
    for key in state:
        if not key.endswith(".weight_packed"):
            continue
        stem = key[: -len(".weight_packed")]
        shape = torch.Size(state[stem + ".weight_shape"].tolist())
        q = unpack_from_int32(state[key], bits, shape)
        scale = state[stem + ".weight_scale"].float()
        zp = state.get(stem + ".weight_zero_point")
        if zp is not None:
            zp = unpack_from_int32(zp, bits, torch.Size([shape[0], scale.shape[1]]), packed_dim=0)
        deq[stem] = dequantize(q, scale, zp, args=args, dtype=torch.float32)
    write_golden(reference_model(out, deq), out, "llmcompressor QuantizationModifier; compressed-tensors "
                                                 "unpack_from_int32 + dequantize in fp32")
    print(name, "done")


# ---- GPTQ (gptqmodel) --------------------------------------------------------------------------

def gptq_golden(out):
    """The reference: gptqmodel's own dequantize_weight of every packed module, in fp32."""
    from gptqmodel import BACKEND, GPTQModel
    loaded = GPTQModel.load(out, device="cpu", backend=BACKEND.GPTQ_TORCH)  # plain torch: no JIT kernels
    state = read_state(out)
    deq = {}
    for mod_name, mod in loaded.model.named_modules():
        if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight"):
            # gptqmodel's CPU loader casts the model, scales included, to bf16; the file's scales
            # are fp16, and they are what the checkpoint means.
            mod.scales = state[mod_name + ".scales"].float()
            deq[mod_name] = mod.dequantize_weight().T.float()
    write_golden(reference_model(out, deq), out, "gptqmodel GPTQ quantize on CPU; gptqmodel dequantize_weight "
                                                 "in fp32 with the file's scales")
    return deq


def make_gptq(root, name, arch, seed, tied, bits, group, sym, desc_act):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    tmp = tempfile.mkdtemp()
    # gptqmodel's tokenizer helper fills in an unset pad id with the architecture's own (Qwen2's is
    # outside this vocabulary): name one.
    dense = make_model(arch, seed, tied, pad_token_id=0)
    save_dense(dense.half(), tmp)
    tok_src = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden", "llama-gqa")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_src, f), tmp)
    g = torch.Generator().manual_seed(seed)
    calibration = [{"input_ids": torch.randint(3, 512, (1, 32), generator=g),
                    "attention_mask": torch.ones(1, 32, dtype=torch.long)} for _ in range(16)]
    # gptqmodel's group-aware reordering (on by default) needs groups; off for one group over K.
    extra = {"act_group_aware": False} if group == -1 else {}
    qcfg = QuantizeConfig(bits=bits, group_size=group, sym=sym, desc_act=desc_act, **extra)
    model = GPTQModel.load(tmp, qcfg, device="cpu")
    model.quantize(calibration, batch_size=1)
    out = fixture_dir(root, name)
    model.save(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # gptqmodel's loader wants them
        shutil.copy(os.path.join(tok_src, f), out)
    gptq_golden(out)
    shutil.rmtree(tmp)
    for f in os.listdir(out):  # gptqmodel also saves the tokenizer and its own notes
        if not (f in ("config.json", "model.safetensors.index.json") or f.startswith("model") or
                f.startswith("golden")):
            os.remove(os.path.join(out, f))
    # gptqmodel records its temporary offload directory: no machine paths in the fixture.
    config_path = os.path.join(out, "config.json")
    config = json.load(open(config_path))
    config["quantization_config"].get("meta", {}).pop("offload_to_disk_path", None)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    print(name, "done")


# ---- AWQ (AutoAWQ packing) -----------------------------------------------------------------------

def make_awq(root, name, arch, seed, tied, group, awq_src):
    import types
    # The sdist's awq/__init__ imports its model zoo (which needs a matching transformers);
    # packing needs only awq.modules.linear.gemm and awq.utils.
    pkg = types.ModuleType("awq")
    pkg.__path__ = [os.path.join(awq_src, "awq")]
    sys.modules["awq"] = pkg
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    model = make_model(arch, seed, tied).half()
    out = fixture_dir(root, name)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    deq = {}
    for mod_name, mod in model.named_modules():
        if not mod_name.split(".")[-1] in LINEARS:
            continue
        w = mod.weight.data.float()
        n, k = w.shape
        wg = w.reshape(n, k // group, group)
        # AutoAWQ's pseudo_quantize_tensor with zero_point=True, 4 bits.
        max_val, min_val = wg.amax(dim=2), wg.amin(dim=2)
        scales = ((max_val - min_val).clamp(min=1e-5) / 15).half().float()
        zeros = (-torch.round(min_val / scales)).clamp(0, 15)
        q = WQLinear_GEMM.from_linear(mod, 4, group, False, scales.t().contiguous(), zeros.t().contiguous())
        for t in ("qweight", "qzeros", "scales"):
            state[f"{mod_name}.{t}"] = getattr(q, t).contiguous()
        del state[f"{mod_name}.weight"]
        deq[mod_name] = dequantize_gemm(q.qweight, q.qzeros, q.scales.float(), 4, group).T.float()
    config = model.config
    config.torch_dtype = "float16"
    config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm", "modules_to_not_convert": None}
    config.to_json_file(os.path.join(out, "config.json"))
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_golden(reference_model(out, deq), out, "AutoAWQ WQLinear_GEMM.from_linear packing; AutoAWQ "
                                                 "dequantize_gemm in fp32")
    print(name, "done")


def make_qwen2_dense(root, name, seed, tied):
    model = make_model("qwen2", seed, tied)
    out = fixture_dir(root, name)
    save_dense(model.half(), out)
    write_golden(reference_model(out, {}), out, "transformers Qwen2ForCausalLM in fp32")
    print(name, "done")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", required=True, choices=["ct", "gptq", "gptq-golden", "awq", "qwen2"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "hf_quant"))
    ap.add_argument("--awq-src", help="the unpacked autoawq sdist (for --which awq)")
    ap.add_argument("--only", help="make only the fixture of this name")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.only:  # every make_* call below names its fixture second
        for fn in ("make_ct", "make_gptq", "make_awq", "make_qwen2_dense"):
            real = globals()[fn]
            globals()[fn] = (lambda real: lambda root, name, *a, **k: real(root, name, *a, **k)
                             if name == args.only else None)(real)
    os.makedirs(args.out, exist_ok=True)
    if args.which == "qwen2":
        make_qwen2_dense(args.out, "qwen2-tied", 21, True)
        make_qwen2_dense(args.out, "qwen2-untied", 22, False)
    elif args.which == "ct":
        make_ct(args.out, "ct-w4a16-asym-g32-qwen2", "qwen2", 31, True, 4, 32, False, shard="60KB")
        make_ct(args.out, "ct-w4a16-sym-g64-llama", "llama", 32, False, 4, 64, True)
        make_ct(args.out, "ct-w8a16-sym-channel-llama", "llama", 33, False, 8, None, True)
        make_ct(args.out, "ct-w8a16-asym-g32-qwen2", "qwen2", 34, False, 8, 32, False, dtype=torch.bfloat16)
    elif args.which == "gptq":
        make_gptq(args.out, "gptq-4bit-g32-asym-llama", "llama", 41, False, 4, 32, False, False)
        make_gptq(args.out, "gptq-4bit-g32-sym-actorder-qwen2", "qwen2", 42, False, 4, 32, True, True)
        make_gptq(args.out, "gptq-8bit-gK-sym-llama", "llama", 43, True, 8, -1, True, False)
    elif args.which == "gptq-golden":  # only the expected logits of the GPTQ fixtures already made
        for name in sorted(os.listdir(args.out)):
            if name.startswith("gptq-") and (not args.only or name == args.only):
                out = os.path.join(args.out, name)
                tok_src = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "golden", "llama-gqa")
                for f in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copy(os.path.join(tok_src, f), out)
                gptq_golden(out)
                for f in ("tokenizer.json", "tokenizer_config.json"):
                    os.remove(os.path.join(out, f))
                print(name, "golden done")
    elif args.which == "awq":
        make_awq(args.out, "awq-g32-qwen2", "qwen2", 51, False, 32, args.awq_src)
        make_awq(args.out, "awq-g64-llama", "llama", 52, True, 64, args.awq_src)


if __name__ == "__main__":
    main()
