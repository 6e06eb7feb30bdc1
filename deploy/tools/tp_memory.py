#!/usr/bin/env python3
"""GPU memory per tensor-parallel rank: weights at fp16 / int8 / int4 and what is left for the KV cache.

The arithmetic behind docs/deploy.md's "Choose the tensor-parallel size" tables; run it to redo
them for another GPU size or reserve:

  deploy/tools/tp_memory.py [--gpu-gib 80] [--reserve-gib 4] [--group 128]
  deploy/tools/tp_memory.py --check-doc docs/deploy.md   # the doc's tables still match (CI)

Counting rules (FineServe's checkpoint format and its Megatron-style tensor parallelism):
  * A quantized linear weight [N, K] stores N*K codes (1 byte at int8, 1/2 byte at int4) plus one
    fp16 scale per (output row, group of `group` inputs): N * K/group * 2 bytes. group = K
    ("column-wise") is one scale per row. fp16 stores 2 bytes per weight and no scales.
  * Quantized: the attention and FFN / expert projections. Kept in 16 bits (`fineserve quantize`'s
    default --keep): token embedding, LM head, positional embedding, norms, biases, MoE router.
  * TP splits the projections evenly across ranks (heads; FFN / expert columns). Everything kept
    in 16 bits is counted whole on every rank (replicated), which is the conservative case.
  * KV cache per token (fp16): 2 (K and V) * layers * kv_heads * head_dim * 2 bytes, split over
    the ranks by KV head.
  * Per GPU, `reserve` GiB go to the CUDA context, cuBLAS/NCCL workspaces and activations; the
    KV cache gets the rest: gpu - reserve - weights per rank.
"""
import argparse
import sys

GIB = 1 << 30


def opt_175b():
    d, layers, vocab, ffn, heads, positions = 12288, 96, 50272, 49152, 96, 2048
    linears = [  # (N, K) of each quantized projection of one layer
        (3 * d, d),  # q, k, v
        (d, d),      # out_proj
        (ffn, d),    # fc1
        (d, ffn),    # fc2
    ]
    kept = (vocab * d                      # embed_tokens (the LM head is tied to it)
            + (positions + 2) * d          # learned positions (OPT offsets them by 2)
            + layers * (3 * d + d + ffn + d)  # biases of q/k/v, out_proj, fc1, fc2
            + layers * 2 * 2 * d           # two LayerNorms (weight + bias) per layer
            + 2 * d)                       # final LayerNorm
    return dict(name="OPT-175B", layers=layers, linears=linears, kept=kept,
                kv_heads=heads, head_dim=d // heads, max_tp=heads)


def mixtral_8x7b():
    d, layers, vocab, ffn, heads, kv_heads, experts = 4096, 32, 32000, 14336, 32, 8, 8
    head_dim = d // heads
    linears = [
        (heads * head_dim, d),     # q_proj
        (kv_heads * head_dim, d),  # k_proj
        (kv_heads * head_dim, d),  # v_proj
        (d, heads * head_dim),     # o_proj
    ] + [(ffn, d), (ffn, d), (d, ffn)] * experts  # w1 (gate), w3 (up), w2 (down) of each expert
    kept = (2 * vocab * d              # embed_tokens and an untied lm_head
            + layers * experts * d     # router (block_sparse_moe.gate)
            + layers * 2 * d + d)      # RMSNorm weights
    return dict(name="Mixtral-8x7B", layers=layers, linears=linears, kept=kept,
                kv_heads=kv_heads, head_dim=head_dim, max_tp=kv_heads)


def weight_bytes(linears, layers, bits, group):
    """Bytes of the quantized projections of all layers (codes + scales), and the element count."""
    codes = scales = elements = 0
    for n, k in linears:
        elements += n * k
        if bits == 16:
            codes += n * k * 2
            continue
        g = k if group == "K" else group
        assert k % g == 0, (n, k, g)
        codes += n * k * bits // 8
        scales += n * (k // g) * 2
    return layers * codes, layers * scales, layers * elements


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-gib", type=float, default=80)
    ap.add_argument("--reserve-gib", type=float, default=4)
    ap.add_argument("--group", default="128", help="int4/int8 group size along K, or K (column-wise)")
    ap.add_argument("--check-doc", metavar="MD", help="check that every row's TP, weights per GPU, KV budget "
                    "and KV tokens appear in this Markdown file, instead of printing")
    args = ap.parse_args()
    group = "K" if args.group == "K" else int(args.group)
    tps = [1, 2, 4, 8]
    rows = []

    for m in (opt_175b(), mixtral_8x7b()):
        kv_token = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * 2
        codes16, _, elements = weight_bytes(m["linears"], m["layers"], 16, group)
        out = (lambda *a, **k: None) if args.check_doc else print
        out(f"\n### {m['name']}\n")
        out(f"- quantized projections: {elements:,} weights; kept in 16 bits: {m['kept']:,} "
              f"({m['kept'] * 2 / GIB:.2f} GiB); total {elements + m['kept']:,} parameters")
        out(f"- KV cache per token (fp16): 2 x {m['layers']} layers x {m['kv_heads']} KV heads x "
              f"{m['head_dim']} x 2 B = {kv_token:,} B = {kv_token / 1024:,.0f} KiB (divided by the TP size per GPU)")
        out(f"- per GPU: {args.gpu_gib:g} GiB - {args.reserve_gib:g} GiB reserve - weights = KV budget; "
              f"tokens = KV budget / (KV per token / TP)\n")
        out("| weights | bits/weight | projections | total weights | TP | weights per GPU | KV budget per GPU | KV tokens (whole replica) |")
        out("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, bits in (("fp16", 16), ("int8", 8), ("int4", 4)):
            codes, scales, _ = weight_bytes(m["linears"], m["layers"], bits, group)
            proj = codes + scales
            kept = m["kept"] * 2
            bpw = proj * 8 / elements
            for tp in tps:
                if tp > m["max_tp"]:
                    continue
                per_gpu = proj / tp + kept
                left = args.gpu_gib * GIB - args.reserve_gib * GIB - per_gpu
                tokens = left / (kv_token / tp)
                fits = left > 0
                tail = (f"| {tp} | {per_gpu / GIB:.2f} GiB | {f'{left / GIB:.2f} GiB' if fits else 'does not fit'} | "
                        f"{f'{int(tokens):,}' if fits else '–'} |")
                rows.append((m["name"], label, tail))
                out(f"| {label if tp == tps[0] else ''} | {f'{bpw:.3f}' if tp == tps[0] else ''} | "
                      f"{f'{proj / GIB:.2f} GiB' if tp == tps[0] else ''} | "
                      f"{f'{(proj + kept) / GIB:.2f} GiB' if tp == tps[0] else ''} | {tp} | {per_gpu / GIB:.2f} GiB | "
                      f"{f'{left / GIB:.2f} GiB' if fits else 'does not fit'} | "
                      f"{f'{int(tokens):,}' if fits else '–'} |")
    if args.check_doc:
        with open(args.check_doc, encoding="utf-8") as f:
            doc = f.read()
        missing = [r for r in rows if r[2] not in doc]
        for name, label, tail in missing:
            print(f"FAIL {args.check_doc}: {name} {label}: no row ending '{tail}' (rerun deploy/tools/tp_memory.py)")
        print(f"{'ok  ' if not missing else 'FAIL'} {args.check_doc}: {len(rows) - len(missing)} of {len(rows)} "
              "TP-memory rows match deploy/tools/tp_memory.py")
        return 1 if missing else 0
    print(f"\n(group size {args.group} along K for int8/int4: one fp16 scale per {args.group} weights of a row)")


if __name__ == "__main__":
    sys.exit(main())
