// The reference version of every CPU op: scalar, single-threaded, written to be obviously correct
// (sums in double). Activations are fp32. The fast kernels and the CUDA backend are tested
// against these; the CPU backend also falls back to them on CPUs without AVX2.
//
// Weights are read in the checkpoint (backend-neutral) layout of kernels/ops.h WeightMatrix.
#pragma once

#include <cstdint>

#include "kernels/ops.h"

namespace fineserve::cpu::ref {

// w[r][c] as the op sees it: the dense value, or code * scale (+ offset, rounded once, when
// asymmetric) for FineQuant codes.
float weight_at(const WeightMatrix& w, int64_t r, int64_t c);

// y[m, w.rows] = x[m, w.cols] · wᵀ (+ bias[w.rows] of bias_dtype when not null).
void linear(const WeightMatrix& w, const float* x, int64_t m, const void* bias, DType bias_dtype, float* y);

// out[i, :] = table[ids[i], :] (+ out[i, :] when accumulate); table [rows, dim] of table_dtype.
void embedding(const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n, bool accumulate,
               float* out);

// y = (x - mean) / sqrt(var + eps) * gamma + beta per row of n (biased variance, as PyTorch).
void layer_norm(const float* x, int64_t m, int64_t n, const void* gamma, const void* beta, DType param_dtype,
                float eps, float* y);
// y = x / sqrt(mean(x²) + eps) * gamma per row of n.
void rms_norm(const float* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps, float* y);

// ReLU; GELU = 0.5 x (1 + erf(x / √2)); GELUTanh = 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)));
// SiLU = x / (1 + e^-x). Computed in double, rounded once.
float activate(Activation kind, float x);
void activation(Activation kind, float* x, int64_t count);
// out[m, n] = act(gate) * up, gate_up [m, 2n] = [gate | up] per row.
void gated_activation(Activation kind, const float* gate_up, int64_t m, int64_t n, float* out);

void add(float* x, const float* y, int64_t count);

// y[m, n] = softmax over each row of x (max-subtracted; -inf entries get probability 0).
void softmax(const float* x, int64_t m, int64_t n, float* y);

// GPT-NeoX rotary in place: for each head and i < rotary_dim / 2, with θ = float(pos) * inv_freq[i]
// rounded to fp32 (as HF computes it), (a, b) = (v[i], v[i + rotary_dim/2]) becomes
// (a cos θ - b sin θ, b cos θ + a sin θ); elements from rotary_dim on are left alone.
void rotary(float* q, float* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
            int head_dim, int rotary_dim, const float* inv_freq);

// Where cache position `pos` of sequence `seq` lives: the row [n_kv_heads, head_dim] of a layer's cache.
int64_t cache_row(const PagedAttention& p, int seq, int64_t pos);

// Writes this step's k, v [n_tokens, n_kv_heads, head_dim] into the paged caches.
void write_kv(const PagedAttention& p, const float* k, const float* v, float* k_cache, float* v_cache);

// out[n_tokens, n_heads * head_dim]: causal (optionally sliding-window) softmax attention over the
// paged cache, exactly as the PagedAttention comment in kernels/ops.h defines it.
void attention(const PagedAttention& p, const float* q, const float* k_cache, const float* v_cache, float* out);

}  // namespace fineserve::cpu::ref
