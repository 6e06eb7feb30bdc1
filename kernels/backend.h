// The backend interface: device memory and one method per op. Models call only this, so the
// same forward runs on the CPU (reference and fast path) and on CUDA.
//
// Activations are in the backend's activation dtype (act_dtype(): F32 on the CPU, F16/BF16 on
// CUDA); every `void*` activation pointer below is of that type and lives in device memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels/ops.h"

namespace fineserve {

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  virtual DType act_dtype() const = 0;

  // ---- memory -----------------------------------------------------------------------------
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* ptr) = 0;
  virtual void copy_to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;

  // Makes a weight usable by linear(): copies it to device memory and re-lays it out for this
  // backend's kernels if it wants to. The returned matrix stays valid while the backend lives.
  virtual WeightMatrix upload_weight(const WeightMatrix& host) = 0;
  // Copies a dense host tensor of `dtype` into device memory (biases, norms, embeddings).
  virtual const void* upload(const void* host, size_t bytes) = 0;

  // ---- ops ----------------------------------------------------------------------------------
  // Models call the named forms below (linear(w, x, m, y), linear(w, x, m, bias, y),
  // layer_norm(x, m, n, gamma, beta, eps, y), rms_norm(x, m, n, gamma, eps, y)); the positional
  // virtual methods they forward to are what a backend implements.

  // y[m, w.rows] = x[m, w.cols] · wᵀ.
  void linear(const WeightMatrix& w, const void* x, int64_t m, void* y) { linear(w, x, m, nullptr, DType::F16, y); }
  // y[m, w.rows] = x[m, w.cols] · wᵀ + bias[w.rows] (when bias is present).
  void linear(const WeightMatrix& w, const void* x, int64_t m, DenseParam bias, void* y) {
    linear(w, x, m, bias.data, bias.dtype, y);
  }
  // y = (x - mean) / sqrt(var + eps) * gamma + beta over rows of length n; an absent gamma/beta
  // (OPT's elementwise_affine = false) is 1/0. Present ones share one dtype (the virtual takes one).
  void layer_norm(const void* x, int64_t m, int64_t n, DenseParam gamma, DenseParam beta, float eps, void* y) {
    layer_norm(x, m, n, gamma.data, beta.data, gamma.present() ? gamma.dtype : beta.dtype, eps, y);
  }
  // y = x / sqrt(mean(x²) + eps) * gamma.
  void rms_norm(const void* x, int64_t m, int64_t n, DenseParam gamma, float eps, void* y) {
    rms_norm(x, m, n, gamma.data, gamma.dtype, eps, y);
  }

  // y[m, w.rows] = x[m, w.cols] · wᵀ (+ bias[w.rows], dense of bias_dtype, when not null).
  virtual void linear(const WeightMatrix& w, const void* x, int64_t m, const void* bias, DType bias_dtype,
                      void* y) = 0;
  // out[i, :] = table[ids[i], :] (+ out[i, :] when accumulate); table is [rows, dim] of table_dtype.
  virtual void embedding(const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n,
                         bool accumulate, void* out) = 0;
  // y = (x - mean) / sqrt(var + eps) * gamma + beta over rows of length n; gamma/beta of param_dtype.
  virtual void layer_norm(const void* x, int64_t m, int64_t n, const void* gamma, const void* beta,
                          DType param_dtype, float eps, void* y) = 0;
  // y = x / sqrt(mean(x²) + eps) * gamma.
  virtual void rms_norm(const void* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps,
                        void* y) = 0;
  virtual void activation(Activation kind, void* x, int64_t count) = 0;
  // out[m, n] = act(gate[m, n]) * up[m, n] where gate_up is [m, 2n] laid out as [gate | up].
  virtual void gated_activation(Activation kind, const void* gate_up, int64_t m, int64_t n, void* out) = 0;
  // x += y (residual add).
  virtual void add(void* x, const void* y, int64_t count) = 0;
  // Rotary position embedding (GPT-NeoX "half rotation" layout, as Llama uses) on q and k in place:
  // q [n_tokens, n_heads, head_dim], k [n_tokens, n_kv_heads, head_dim];
  // inv_freq [rotary_dim / 2] (already includes any rope scaling).
  virtual void rotary(void* q, void* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
                      int head_dim, int rotary_dim, const float* inv_freq) = 0;
  // Writes this step's keys and values [n_tokens, n_kv_heads, head_dim] into the paged cache.
  virtual void write_kv(const PagedAttention& p, const void* k, const void* v, void* k_cache, void* v_cache) = 0;
  // out[n_tokens, n_heads * head_dim] = softmax(q kᵀ * scale) v over the paged cache.
  virtual void attention(const PagedAttention& p, const void* q, const void* k_cache, const void* v_cache,
                         void* out) = 0;
  // Converts rows of activations to fp32 on the host (logits): dst[m, n].
  virtual void to_host_f32(const void* src, int64_t count, float* dst) = 0;

  // ---- MoE ----------------------------------------------------------------------------------
  // Mixtral-style sparse experts run grouped: route every token, gather each expert's tokens into
  // contiguous rows (the row gather is embedding() with the activations as the table), run the
  // expert's GEMMs through linear(), and scatter-add the outputs back weighted by the router.
  //
  // Per token t: p = softmax(router_logits[t, :]) in fp32 (router_logits [n_tokens, n_experts]);
  // expert_ids[t, :top_k] (int32) = the top_k experts by p, most probable first (ties: lower index
  // first); weights[t, j] (fp32) = p[expert_ids[t, j]] renormalised over the top_k to sum to 1 (as
  // HF's MixtralTopKRouter). Both outputs [n_tokens, top_k] in device memory.
  virtual void moe_route(const void* router_logits, int64_t n_tokens, int n_experts, int top_k, int32_t* expert_ids,
                         float* weights) = 0;
  // dst[rows[i], :] += weights[i] * src[i, :] for i < n, in order of i (rows may repeat);
  // src [n, dim], rows [n], weights [n] fp32, dst [dst_rows, dim].
  virtual void scatter_add_rows(const void* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim,
                                void* dst, int64_t dst_rows) = 0;
};

std::unique_ptr<Backend> make_cpu_backend();

}  // namespace fineserve
