#include "kernels/cpu/cpu_backend.h"

#include <atomic>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/aligned.h"
#include "kernels/cpu/fast_ops.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/gemm_a8.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/reference.h"
#include "kernels/cpu/simd.h"
#include "kernels/cpu/validate.h"

namespace fineserve {
namespace {

cpu::Isa choose_isa(const CpuOptions& o) {
  if (o.reference) return cpu::Isa::Reference;
  const cpu::Isa isa = o.isa.value_or(cpu::best_isa());
  if (!cpu::isa_supported(isa))
    throw Error("cpu backend: this CPU does not run the " + std::string(cpu::isa_name(isa)) + " kernels");
  return isa;
}

// Which backend instance a cached look-up belongs to: never reused, unlike addresses.
std::atomic<uint64_t> next_backend_id{1};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuOptions& o)
      : isa_(choose_isa(o)),
        fast_(isa_ != cpu::Isa::Reference),
        threads_(o.threads),
        int8_activations_(o.int8_activations),
        int8_dense_weights_(o.int8_dense_weights) {}

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

  WeightMatrix upload_weight(const WeightMatrix& source) override {
    cpu::validate_weight(source, "upload_weight");
    cpu::Int8Weight requantized;
    if (int8_dense_weights_ && !source.quantized()) requantized = cpu::quantize_dense_int8(source);
    const WeightMatrix& host = requantized.w.data ? requantized.w : source;
    std::lock_guard<std::mutex> lock(mu_);
    if (fast_) {
      packed_.push_back(cpu::pack_weight(host));
      const cpu::PackedWeight& p = packed_.back();
      by_data_.emplace(p.shape.data, &p);
      return p.shape;
    }
    // Reference: an aligned copy in the checkpoint layout.
    WeightMatrix w = host;
    const int64_t code_bytes = host.quantized() ? host.rows * host.cols * host.bits / 8 : host.bytes();
    w.data = keep(host.data, static_cast<size_t>(code_bytes));
    if (host.quantized())
      w.scales = static_cast<const uint16_t*>(keep(host.scales, static_cast<size_t>(host.rows * host.groups_per_row() * 2)));
    if (host.offsets)
      w.offsets = static_cast<const float*>(keep(host.offsets, static_cast<size_t>(host.rows * host.groups_per_row() * 4)));
    return w;
  }

  const void* upload(const void* host, size_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    return keep(host, bytes);
  }

  void linear(const WeightMatrix& w, const void* x, int64_t m, const void* bias, DType bias_dtype, void* y) override {
    const cpu::PackedWeight* p = fast_ ? find_packed(w.data) : nullptr;
    const bool int8_act = int8_activations_ && w.quantized();
    if (p) {
      FS_ASSERT(p->shape.rows == w.rows && p->shape.cols == w.cols && p->shape.bits == w.bits &&
                    p->shape.group == w.group && p->shape.dtype == w.dtype,
                "linear: weight does not match what upload_weight returned");
      if (int8_act) return cpu::linear_int8_act(*p, f(x), m, bias, bias_dtype, f(y), isa_, threads_);
      return cpu::linear(*p, f(x), m, bias, bias_dtype, f(y), isa_, threads_);
    }
    if (int8_act) return cpu::ref::linear_int8_act(w, f(x), m, bias, bias_dtype, f(y));
    cpu::ref::linear(w, f(x), m, bias, bias_dtype, f(y));
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

  // The packed weight whose codes start at `data`, or null. linear() runs hundreds of times per
  // token: a per-thread direct-mapped cache answers it without the mutex or a hash-map walk after
  // the first call per weight (entries are tagged with this backend's id; packed weights live as
  // long as the backend and never move, a std::deque).
  const cpu::PackedWeight* find_packed(const void* data) {
    struct Entry {
      uint64_t backend = 0;
      const void* data = nullptr;
      const cpu::PackedWeight* packed = nullptr;
    };
    constexpr size_t kSlots = 1024;
    thread_local Entry cache[kSlots];
    const auto key = reinterpret_cast<uintptr_t>(data);
    Entry& e = cache[((key >> 6) * 0x9E3779B97F4A7C15ull) >> 54];  // Fibonacci hashing to 10 bits
    if (e.backend == id_ && e.data == data) return e.packed;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_data_.find(data);
    if (it == by_data_.end()) return nullptr;
    e = {id_, data, it->second};
    return it->second;
  }

  // An owned aligned copy of host bytes (caller holds mu_).
  const void* keep(const void* host, size_t bytes) {
    cpu::AlignedBytes b = cpu::aligned_zeros(bytes);
    if (bytes) std::memcpy(b.get(), host, bytes);
    owned_.push_back(std::move(b));
    return owned_.back().get();
  }

  const cpu::Isa isa_;
  const bool fast_;
  const int threads_;
  const bool int8_activations_, int8_dense_weights_;
  const uint64_t id_ = next_backend_id.fetch_add(1);
  std::mutex mu_;
  std::deque<cpu::PackedWeight> packed_;
  std::unordered_map<const void*, const cpu::PackedWeight*> by_data_;
  std::vector<cpu::AlignedBytes> owned_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const CpuOptions& options) { return std::make_unique<CpuBackend>(options); }

std::unique_ptr<Backend> make_cpu_backend() { return make_cpu_backend(CpuOptions{}); }

}  // namespace fineserve
