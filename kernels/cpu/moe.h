// The CPU MoE routing ops (fp32 activations): Mixtral's top-k routing and the weighted scatter-add
// that combines expert outputs. Contracts as Backend::moe_route / Backend::scatter_add_rows.
#pragma once

#include <cstdint>

namespace fineserve::cpu {

namespace ref {

// Per token t: p = softmax(router_logits[t, :n_experts]); expert_ids[t, :top_k] = the top_k experts
// by p, most probable first (ties: the lower index first); weights[t, j] = p[id_j] / Σ_j p[id_j].
// Computed in double, rounded once.
void moe_route(const float* router_logits, int64_t n_tokens, int n_experts, int top_k, int32_t* expert_ids,
               float* weights);

// dst[rows[i], :] += weights[i] * src[i, :] for i = 0, 1, ..., n - 1 in order (rows may repeat);
// dst is [dst_rows, dim]. Products in double, rounded once per addition.
void scatter_add_rows(const float* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                      float* dst, int64_t dst_rows);

}  // namespace ref

// The fast scatter-add (call only when has_avx2()): FMA in fp32, OpenMP over column slices so that
// repeated rows need no atomics and every element still sums in the order of i.
void scatter_add_rows(const float* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                      float* dst, int64_t dst_rows, int threads = 0);

}  // namespace fineserve::cpu
