#include "kernels/cpu/cpu_backend.h"

#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/aligned.h"
#include "kernels/cpu/fast_ops.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/reference.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/validate.h"

namespace fineserve {
namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuOptions& o) : fast_(!o.reference && cpu::has_avx2()), threads_(o.threads) {}

  std::string name() const override { return fast_ ? "cpu" : "cpu-reference"; }
  DType act_dtype() const override { return DType::F32; }

  void* alloc(size_t bytes) override { return cpu::aligned_malloc(bytes); }
  void free(void* ptr) override { std::free(ptr); }
  void copy_to_device(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memmove(dst, src, bytes);
  }
  void synchronize() override {}

  WeightMatrix upload_weight(const WeightMatrix& host) override {
    cpu::validate_weight(host, "upload_weight");
    std::lock_guard<std::mutex> lock(mu_);
    if (fast_) {
      cpu::PackedWeight p = cpu::pack_weight(host);
      const WeightMatrix shape = p.shape;
      packed_.emplace(shape.data, std::move(p));
      return shape;
    }
    // Reference: an aligned copy in the checkpoint layout.
    WeightMatrix w = host;
    const int64_t code_bytes = host.quantized() ? host.rows * host.cols * host.bits / 8 : host.bytes();
    w.data = keep(host.data, static_cast<size_t>(code_bytes));
    if (host.quantized())
      w.scales = static_cast<const uint16_t*>(keep(host.scales, static_cast<size_t>(host.rows * host.groups_per_row() * 2)));
    return w;
  }

  const void* upload(const void* host, size_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    return keep(host, bytes);
  }

  void linear(const WeightMatrix& w, const void* x, int64_t m, const void* bias, DType bias_dtype, void* y) override {
    const cpu::PackedWeight* p = nullptr;
    if (fast_) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = packed_.find(w.data);
      if (it != packed_.end()) p = &it->second;
    }
    if (p) {
      FS_ASSERT(p->shape.rows == w.rows && p->shape.cols == w.cols && p->shape.bits == w.bits &&
                    p->shape.group == w.group && p->shape.dtype == w.dtype,
                "linear: weight does not match what upload_weight returned");
      cpu::linear(*p, f(x), m, bias, bias_dtype, f(y), threads_);
    } else {
      cpu::ref::linear(w, f(x), m, bias, bias_dtype, f(y));
    }
  }

  void embedding(const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n, bool accumulate,
                 void* out) override {
    if (fast_) return cpu::embedding(table, table_dtype, dim, ids, n, accumulate, f(out), threads_);
    cpu::ref::embedding(table, table_dtype, dim, ids, n, accumulate, f(out));
  }

  void layer_norm(const void* x, int64_t m, int64_t n, const void* gamma, const void* beta, DType param_dtype,
                  float eps, void* y) override {
    if (fast_) return cpu::layer_norm(f(x), m, n, gamma, beta, param_dtype, eps, f(y), threads_);
    cpu::ref::layer_norm(f(x), m, n, gamma, beta, param_dtype, eps, f(y));
  }

  void rms_norm(const void* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps,
                void* y) override {
    if (fast_) return cpu::rms_norm(f(x), m, n, gamma, param_dtype, eps, f(y), threads_);
    cpu::ref::rms_norm(f(x), m, n, gamma, param_dtype, eps, f(y));
  }

  void activation(Activation kind, void* x, int64_t count) override {
    if (fast_) return cpu::activation(kind, f(x), count, threads_);
    cpu::ref::activation(kind, f(x), count);
  }

  void gated_activation(Activation kind, const void* gate_up, int64_t m, int64_t n, void* out) override {
    if (fast_) return cpu::gated_activation(kind, f(gate_up), m, n, f(out), threads_);
    cpu::ref::gated_activation(kind, f(gate_up), m, n, f(out));
  }

  void add(void* x, const void* y, int64_t count) override {
    if (fast_) return cpu::add(f(x), f(y), count, threads_);
    cpu::ref::add(f(x), f(y), count);
  }

  void rotary(void* q, void* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
              int head_dim, int rotary_dim, const float* inv_freq) override {
    if (fast_)
      return cpu::rotary(f(q), f(k), positions, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, inv_freq,
                         threads_);
    cpu::ref::rotary(f(q), f(k), positions, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, inv_freq);
  }

  void write_kv(const PagedAttention& p, const void* k, const void* v, void* k_cache, void* v_cache) override {
    if (fast_) return cpu::write_kv(p, f(k), f(v), f(k_cache), f(v_cache));
    cpu::ref::write_kv(p, f(k), f(v), f(k_cache), f(v_cache));
  }

  void attention(const PagedAttention& p, const void* q, const void* k_cache, const void* v_cache,
                 void* out) override {
    if (fast_) return cpu::attention(p, f(q), f(k_cache), f(v_cache), f(out), threads_);
    cpu::ref::attention(p, f(q), f(k_cache), f(v_cache), f(out));
  }

  void to_host_f32(const void* src, int64_t count, float* dst) override {
    if (count > 0) std::memmove(dst, src, static_cast<size_t>(count) * 4);
  }

  // ---- MoE ----------------------------------------------------------------------------------
  void moe_route(const void* router_logits, int64_t n_tokens, int n_experts, int top_k, int32_t* expert_ids,
                 float* weights) override {
    // One path: n_tokens x n_experts scalars (8 experts), nothing worth vectorising.
    cpu::ref::moe_route(f(router_logits), n_tokens, n_experts, top_k, expert_ids, weights);
  }

  void scatter_add_rows(const void* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim, void* dst,
                        int64_t dst_rows) override {
    if (fast_) return cpu::scatter_add_rows(f(src), rows, weights, n, dim, f(dst), dst_rows, threads_);
    cpu::ref::scatter_add_rows(f(src), rows, weights, n, dim, f(dst), dst_rows);
  }

 private:
  static float* f(void* p) { return static_cast<float*>(p); }
  static const float* f(const void* p) { return static_cast<const float*>(p); }

  // An owned aligned copy of host bytes (caller holds mu_).
  const void* keep(const void* host, size_t bytes) {
    cpu::AlignedBytes b = cpu::aligned_zeros(bytes);
    if (bytes) std::memcpy(b.get(), host, bytes);
    owned_.push_back(std::move(b));
    return owned_.back().get();
  }

  const bool fast_;
  const int threads_;
  std::mutex mu_;
  std::unordered_map<const void*, cpu::PackedWeight> packed_;
  std::vector<cpu::AlignedBytes> owned_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const CpuOptions& options) { return std::make_unique<CpuBackend>(options); }

std::unique_ptr<Backend> make_cpu_backend() { return make_cpu_backend(CpuOptions{}); }

}  // namespace fineserve
