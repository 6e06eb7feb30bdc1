#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/base.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/ops_plan.h"

namespace fineserve {
namespace {

using cuda::check_cuda;

std::string mib(size_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, DType act, const CudaOptions& options) : device_(device), act_(act) {
    if (act != DType::F16 && act != DType::BF16)
      throw Error("CUDA activations must be F16 or BF16, got " + std::string(dtype_name(act)));
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear it: the process may go on with the CPU
      throw Error(std::string("no usable CUDA device (cudaGetDeviceCount: ") + cudaGetErrorString(e) + ")");
    }
    if (device < 0 || device >= count)
      throw Error("CUDA device " + std::to_string(device) + " does not exist: this machine has " +
                  std::to_string(count) + " CUDA device" + (count == 1 ? "" : "s"));
    try {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      cudaDeviceProp prop{};
      check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
      name_ = "cuda:" + std::to_string(device) + " (" + prop.name + ")";
      sm_count_ = prop.multiProcessorCount;
      // A blocking stream (not cudaStreamNonBlocking): it stays ordered with work on the legacy
      // default stream, such as synchronous cudaMemcpy uploads.
      check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate");
      // The fault word in mapped pinned memory: kernels write it, the host reads it after a sync
      // without another copy.
      check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&fault_host_), sizeof(int), cudaHostAllocMapped),
                 "cudaHostAlloc (fault word)");
      *fault_host_ = 0;
      check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&fault_dev_), fault_host_, 0),
                 "cudaHostGetDevicePointer (fault word)");
      poison_ = options.poison_workspaces;  // tests and sanitizer runs: NaN-fill workspaces
      cuda::GemmOptions gemm_options;
      gemm_options.poison_workspaces = poison_;
      gemm_ = std::make_unique<cuda::Gemm>(act, stream_, gemm_options);
    } catch (...) {
      release();
      throw;
    }
  }

  ~CudaBackend() override { release(); }

  std::string name() const override { return name_; }
  DType act_dtype() const override { return act_; }

  // ---- memory -----------------------------------------------------------------------------
  void* alloc(size_t bytes) override {
    enter();
    void* p = device_malloc(bytes, "alloc");
    std::lock_guard<std::mutex> lock(mu_);
    allocations_[p] = bytes;
    return p;
  }

  void free(void* ptr) override {
    if (!ptr) return;
    enter();
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = allocations_.find(ptr);
      FS_ASSERT(it != allocations_.end(), "free() of a pointer this backend's alloc() did not return");
      mirror_.forget(ptr, it->second);
      allocations_.erase(it);
    }
    check_cuda(cudaFree(ptr), "cudaFree");
  }

  void copy_to_device(void* dst, const void* host_src, size_t bytes) override {
    if (bytes == 0) return;
    enter();
    {
      std::lock_guard<std::mutex> lock(mu_);
      mirror_.record(dst, host_src, bytes);
    }
    // Pageable host memory: the call returns once the source is staged, so it may be reused.
    check_cuda(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (copy_to_device)");
  }

  void copy_to_host(void* host_dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    enter();
    check_cuda(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (copy_to_host)");
    wait();
  }

  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    enter();
    {
      std::lock_guard<std::mutex> lock(mu_);
      mirror_.forget(dst, bytes);
    }
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "cudaMemcpyAsync (copy)");
  }

  void synchronize() override {
    enter();
    wait();
  }

  WeightMatrix upload_weight(const WeightMatrix& host) override {
    enter();
    std::lock_guard<std::mutex> lock(gemm_mu_);
    return gemm_->upload(host);
  }

  const void* upload(const void* host, size_t bytes) override {
    enter();
    void* p = device_malloc(bytes, "upload");
    {
      std::lock_guard<std::mutex> lock(mu_);
      owned_.push_back(p);
    }
    if (bytes) {
      check_cuda(cudaMemcpyAsync(p, host, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (upload)");
      check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (upload)");  // load time: keep it simple
    }
    return p;
  }

  // ---- ops ----------------------------------------------------------------------------------
  void linear(const WeightMatrix& w, const void* x, int64_t m, const void* bias, DType bias_dtype, void* y) override {
    enter();
    std::lock_guard<std::mutex> lock(gemm_mu_);
    gemm_->linear(w, x, m, bias, bias_dtype, y);
  }

  void embedding(const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n, bool accumulate,
                 void* out) override {
    enter();
    cuda::embedding(act_, table, table_dtype, dim, ids, n, accumulate, out, fault_dev_, stream_);
  }

  void layer_norm(const void* x, int64_t m, int64_t n, const void* gamma, const void* beta, DType param_dtype,
                  float eps, void* y) override {
    enter();
    cuda::layer_norm(act_, x, m, n, gamma, beta, param_dtype, eps, y, stream_);
  }

  void rms_norm(const void* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps,
                void* y) override {
    enter();
    cuda::rms_norm(act_, x, m, n, gamma, param_dtype, eps, y, stream_);
  }

  void activation(Activation kind, void* x, int64_t count) override {
    enter();
    cuda::activation(act_, kind, x, count, stream_);
  }

  void gated_activation(Activation kind, const void* gate_up, int64_t m, int64_t n, void* out) override {
    enter();
    cuda::gated_activation(act_, kind, gate_up, m, n, out, stream_);
  }

  void add(void* x, const void* y, int64_t count) override {
    enter();
    cuda::add(act_, x, y, count, stream_);
  }

  void rotary(void* q, void* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
              int head_dim, int rotary_dim, const float* inv_freq) override {
    enter();
    cuda::rotary(act_, q, k, positions, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, inv_freq, stream_);
  }

  void write_kv(const PagedAttention& p, const void* k, const void* v, void* k_cache, void* v_cache) override {
    enter();
    std::lock_guard<std::mutex> lock(mu_);
    const cuda::AttentionPlan plan = plan_for(p);
    cuda::write_kv(act_, p, plan, k, v, k_cache, v_cache, fault_dev_, stream_);
  }

  void attention(const PagedAttention& p, const void* q, const void* k_cache, const void* v_cache,
                 void* out) override {
    enter();
    std::lock_guard<std::mutex> lock(mu_);
    const cuda::AttentionPlan plan = plan_for(p);
    if (plan.items.empty()) return;
    // The plan's arrays, then the partial results of split tiles, in one grow-only buffer.
    const size_t item_bytes = plan.items.size() * sizeof(cuda::AttentionItem);
    const size_t group_bytes = plan.groups.size() * sizeof(cuda::AttentionGroup);
    const size_t rows = static_cast<size_t>(plan.n_partials) * static_cast<size_t>(plan.grid_y) * cuda::kAttnRows;
    const size_t o_floats = rows * static_cast<size_t>(p.head_dim), ml_floats = rows * 2;
    const size_t groups_at = align(item_bytes), o_at = align(groups_at + group_bytes), ml_at = align(o_at + o_floats * 4);
    char* base = static_cast<char*>(reserve(attn_work_, ml_at + ml_floats * 4, "attention workspace"));
    // Every layer of a step plans from the same arrays: the plan uploaded for the previous layer is
    // still in the workspace (only this method writes it, in stream order), so skip the copy.
    const std::vector<int32_t> key = {p.n_seqs, p.n_heads, p.n_kv_heads, p.head_dim, p.sliding_window};
    const bool same_plan = base == plan_base_ && key == plan_key_ && plan_qs_ == planned_qs_ && plan_ctx_ == planned_ctx_;
    if (!same_plan) {
      check_cuda(cudaMemcpyAsync(base, plan.items.data(), item_bytes, cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync (attention plan)");
      if (group_bytes)
        check_cuda(cudaMemcpyAsync(base + groups_at, plan.groups.data(), group_bytes, cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpyAsync (attention plan)");
      plan_base_ = base;
      plan_key_ = key;
      planned_qs_ = plan_qs_;
      planned_ctx_ = plan_ctx_;
    }
    if (poison_ && rows)  // the partial results only: the plan above may be reused
      check_cuda(cudaMemsetAsync(base + o_at, 0xFF, ml_at + ml_floats * 4 - o_at, stream_), "cudaMemsetAsync (poison)");
    cuda::AttentionWork work;
    work.items = reinterpret_cast<const cuda::AttentionItem*>(base);
    work.groups = reinterpret_cast<const cuda::AttentionGroup*>(base + groups_at);
    work.partial_o = reinterpret_cast<float*>(base + o_at);
    work.partial_ml = reinterpret_cast<float*>(base + ml_at);
    work.fault = fault_dev_;
    cuda::attention(act_, p, plan, work, q, k_cache, v_cache, out, stream_);
  }

  void to_host_f32(const void* src, int64_t count, float* dst) override {
    if (count <= 0) return;
    enter();
    std::lock_guard<std::mutex> lock(mu_);
    const size_t bytes = static_cast<size_t>(count) * 4;
    auto* staging = static_cast<float*>(reserve(f32_stage_, bytes, "to_host_f32 staging"));
    cuda::to_f32(act_, src, count, staging, stream_);
    check_cuda(cudaMemcpyAsync(dst, staging, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (to_host_f32)");
    wait();
  }

  // ---- MoE ----------------------------------------------------------------------------------
  void moe_route(const void* router_logits, int64_t n_tokens, int n_experts, int top_k, int32_t* expert_ids,
                 float* weights) override {
    enter();
    cuda::moe_route(act_, router_logits, n_tokens, n_experts, top_k, expert_ids, weights, stream_);
  }

  void scatter_add_rows(const void* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim, void* dst,
                        int64_t dst_rows) override {
    enter();
    cuda::scatter_add_rows(act_, src, rows, weights, n, dim, dst, dst_rows, fault_dev_, stream_);
  }

 private:
  struct Scratch {
    void* ptr = nullptr;
    size_t bytes = 0;
  };

  static size_t align(size_t n) { return (n + 255) / 256 * 256; }

  // The backend's GPU, current on the calling thread (the engine may call from any thread).
  void enter() const { check_cuda(cudaSetDevice(device_), "cudaSetDevice"); }

  // cudaMalloc of at least one byte; out of memory is a clear Error.
  void* device_malloc(size_t bytes, const char* what) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes == 0 ? 1 : bytes);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // not sticky: clear it
      size_t free_bytes = 0, total = 0;
      cudaMemGetInfo(&free_bytes, &total);
      throw Error("CUDA out of memory on " + name_ + " (" + what + "): asked for " + mib(bytes) + ", " +
                  mib(free_bytes) + " free of " + mib(total));
    }
    check_cuda(e, what);
    return p;
  }

  // A grow-only device buffer of at least `bytes` (caller holds mu_). Growing waits for the stream,
  // which may still be reading the old buffer.
  void* reserve(Scratch& s, size_t bytes, const char* what) {
    if (bytes <= s.bytes && s.ptr) return s.ptr;
    const size_t want = std::max(bytes, s.bytes * 2);
    if (s.ptr) {
      check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
      check_cuda(cudaFree(s.ptr), "cudaFree");
      s.ptr = nullptr;
      s.bytes = 0;
    }
    s.ptr = device_malloc(want, what);
    s.bytes = want;
    plan_base_ = nullptr;  // a new buffer (possibly at the old address) holds no plan yet
    return s.ptr;
  }

  // The host copies of p's query_start and context_len (the mirror, else a read-back), planned.
  cuda::AttentionPlan plan_for(const PagedAttention& p) {
    PagedAttention h = p;
    if (p.n_seqs > 0) {
      const size_t n = static_cast<size_t>(p.n_seqs);
      if (!mirror_.read_i32(p.query_start, n + 1, plan_qs_) || !mirror_.read_i32(p.context_len, n, plan_ctx_)) {
        plan_qs_.resize(n + 1);
        plan_ctx_.resize(n);
        check_cuda(cudaMemcpyAsync(plan_qs_.data(), p.query_start, (n + 1) * 4, cudaMemcpyDeviceToHost, stream_),
                   "cudaMemcpyAsync (attention plan read-back)");
        check_cuda(cudaMemcpyAsync(plan_ctx_.data(), p.context_len, n * 4, cudaMemcpyDeviceToHost, stream_),
                   "cudaMemcpyAsync (attention plan read-back)");
        check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (attention plan read-back)");
      }
      h.query_start = plan_qs_.data();
      h.context_len = plan_ctx_.data();
    }
    h.block_table = nullptr;  // not read by the planner
    return cuda::plan_attention(h, 2 * sm_count_);
  }

  // Waits for the stream; a kernel's recorded fault stops the process (a programmer fault).
  void wait() {
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    const int f = *static_cast<volatile int*>(fault_host_);
    if (f == 0) return;
    std::string why;
    if (f & cuda::kFaultAttentionPlan)
      why += "write_kv/attention: query_start or context_len changed on the device after the launch was planned "
             "(write them with copy_to_device); ";
    if (f & cuda::kFaultBlockTable) why += "negative block id in block table; ";
    if (f & cuda::kFaultScatterRow) why += "scatter_add_rows: row out of range; ";
    if (f & cuda::kFaultEmbeddingId) why += "negative token id reached embedding; ";
    assert_fail("CUDA kernel input fault", __FILE__, __LINE__, why.c_str());
  }

  // Frees everything (also after a constructor failure); never throws.
  void release() noexcept {
    if (device_ >= 0) cudaSetDevice(device_);
    if (stream_) cudaStreamSynchronize(stream_);
    gemm_.reset();
    for (void* p : owned_) cudaFree(p);
    owned_.clear();
    for (auto& [p, bytes] : allocations_) cudaFree(p);  // what the models did not free
    allocations_.clear();
    for (Scratch* s : {&attn_work_, &f32_stage_})
      if (s->ptr) cudaFree(s->ptr);
    if (fault_host_) cudaFreeHost(fault_host_);
    fault_host_ = nullptr;
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = nullptr;
  }

  const int device_;
  const DType act_;
  std::string name_;
  int sm_count_ = 1;
  cudaStream_t stream_ = nullptr;
  int* fault_host_ = nullptr;  // mapped pinned memory: the kernels' fault word
  int* fault_dev_ = nullptr;   // its device address
  bool poison_ = false;
  std::unique_ptr<cuda::Gemm> gemm_;
  std::mutex gemm_mu_;  // Gemm keeps its own workspace

  std::mutex mu_;  // everything below
  std::unordered_map<void*, size_t> allocations_;  // alloc() -> bytes
  std::vector<void*> owned_;                       // upload()
  cuda::IndexMirror mirror_;
  Scratch attn_work_, f32_stage_;
  std::vector<int32_t> plan_qs_, plan_ctx_;  // plan_for's host copies of query_start, context_len
  // What the attention plan in attn_work_ was made from.
  const void* plan_base_ = nullptr;
  std::vector<int32_t> plan_key_, planned_qs_, planned_ctx_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device_index, DType act, const CudaOptions& options) {
  return std::make_unique<CudaBackend>(device_index, act, options);
}

bool cuda_backend_built() { return true; }

}  // namespace fineserve
