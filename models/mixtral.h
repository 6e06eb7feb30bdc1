// Mixtral's sparse mixture-of-experts feed-forward block (Jiang et al. 2024, "Mixtral of Experts";
// HF MixtralSparseMoeBlock): a linear router scores the experts, each token goes to its top_k
// (softmax over all experts in fp32, top_k, renormalised), and the output is the router-weighted
// sum of those experts' SwiGLU MLPs: y = Σ_j w_j · w2_e(act(w1_e x) * w3_e x), e = expert j.
//
// Execution is grouped by expert, so every weight matrix streams once per step and no GEMM is
// per token: route all tokens, gather each expert's tokens into contiguous rows, run the expert's
// [w1 | w3] and w2 GEMMs over them, and scatter-add the outputs into the residual stream weighted
// by the router. The grouping (a counting sort of the T·top_k assignments) is planned on the host
// from the routed expert ids: the per-expert row counts are GEMM sizes the host must know anyway.
//
// The router stays in 16 bits (quantize never quantizes it: it is tiny and a flipped top-k choice
// changes the whole token's output); experts may use fewer bits than attention (--expert-bits).
//
// Tensor parallelism: every rank holds a slice of every expert (w1/w3 column-parallel, w2
// row-parallel) and the whole router, so all ranks route alike and run the same plan; the block's
// output is each rank's partial sum, completed by the layer's one all-reduce.
#pragma once

#include <memory>
#include <string>

#include "models/llama.h"

namespace fineserve {

// The sparse MoE block of the layer whose tensors start with `layer` ("layers.3."):
// block_sparse_moe.gate.weight [n_experts, hidden] and block_sparse_moe.experts.E.{w1, w3}
// [ffn, hidden], w2 [hidden, ffn] (dense or FineQuant, each expert's bits its own), this rank's
// slice of each under tensor parallelism.
std::unique_ptr<LlamaFfn> load_sparse_moe(const LlamaLoadContext& ctx, const std::string& layer);

}  // namespace fineserve
