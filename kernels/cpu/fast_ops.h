// The fast CPU versions of the non-GEMM ops (fp32 activations): AVX2 + FMA, OpenMP over rows,
// tokens or (token, head) pairs when the work is large enough. Same contracts as cpu::ref (see
// reference.h); call only when has_avx2(). `threads` <= 0 uses OpenMP's default.
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace fineserve::cpu {

void embedding(const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n, bool accumulate,
               float* out, int threads = 0);
void layer_norm(const float* x, int64_t m, int64_t n, const void* gamma, const void* beta, DType param_dtype,
                float eps, float* y, int threads = 0);
void rms_norm(const float* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps, float* y,
              int threads = 0);
void activation(Activation kind, float* x, int64_t count, int threads = 0);
void gated_activation(Activation kind, const float* gate_up, int64_t m, int64_t n, float* out, int threads = 0);
void add(float* x, const float* y, int64_t count, int threads = 0);
void softmax(const float* x, int64_t m, int64_t n, float* y, int threads = 0);
void rotary(float* q, float* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
            int head_dim, int rotary_dim, const float* inv_freq, int threads = 0);
void write_kv(const PagedAttention& p, const float* k, const float* v, float* k_cache, float* v_cache);
// Two-pass softmax attention per (query token, head), parallel over those pairs.
void attention(const PagedAttention& p, const float* q, const float* k_cache, const float* v_cache, float* out,
               int threads = 0);

}  // namespace fineserve::cpu
