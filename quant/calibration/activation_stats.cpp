#include "quant/calibration/activation_stats.h"

#include <algorithm>
#include <memory>
#include <string_view>
#include <unordered_map>

#include "kernels/backend.h"
#include "kernels/base.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"

namespace fineserve::quant {
namespace fs = std::filesystem;
namespace {

uint64_t fnv1a(const std::byte* data, uint64_t n) {
  uint64_t h = 1469598103934665603ull;
  for (uint64_t i = 0; i < n; ++i) h = (h ^ static_cast<uint64_t>(data[i])) * 1099511628211ull;
  return h ^ n;  // the length too: equal prefixes of different sizes stay apart
}

// Sums of x_k² for one uploaded matrix, shared by the source weights it holds.
struct Sums {
  std::vector<std::string> names;
  std::vector<double> sum_sq;  // [cols]
  int64_t rows_seen = 0;
};

// Forwards everything to `inner`; records the inputs of the linear layers it recognises.
class RecordingBackend final : public Backend {
 public:
  RecordingBackend(Backend& inner, std::unordered_map<uint64_t, std::string> by_hash)
      : inner_(inner), by_hash_(std::move(by_hash)) {
    if (inner_.act_dtype() != DType::F32) throw Error("calibration needs fp32 activations");
  }

  std::vector<Sums>& sums() { return sums_; }

  std::string name() const override { return "calibration(" + inner_.name() + ")"; }
  DType act_dtype() const override { return inner_.act_dtype(); }
  void* alloc(size_t bytes) override { return inner_.alloc(bytes); }
  void free(void* ptr) override { inner_.free(ptr); }
  void copy_to_device(void* dst, const void* src, size_t bytes) override { inner_.copy_to_device(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override { inner_.copy_to_host(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { inner_.copy(dst, src, bytes); }
  void synchronize() override { inner_.synchronize(); }
  const void* upload(const void* host, size_t bytes) override { return inner_.upload(host, bytes); }

  WeightMatrix upload_weight(const WeightMatrix& host) override {
    const WeightMatrix uploaded = inner_.upload_weight(host);
    if (host.quantized() || host.rows <= 0 || host.cols <= 0) return uploaded;
    const auto* data = static_cast<const std::byte*>(host.data);
    const uint64_t bytes = static_cast<uint64_t>(host.rows * host.cols) * dtype_size(host.dtype);
    std::vector<std::string> names;
    if (auto it = by_hash_.find(fnv1a(data, bytes)); it != by_hash_.end()) {
      names.push_back(it->second);
    } else if (host.rows % 2 == 0) {  // two matrices stacked by rows (gate_up): both halves must match
      auto a = by_hash_.find(fnv1a(data, bytes / 2)), b = by_hash_.find(fnv1a(data + bytes / 2, bytes / 2));
      if (a != by_hash_.end() && b != by_hash_.end()) names = {a->second, b->second};
    }
    if (!names.empty()) {
      index_[uploaded.data] = sums_.size();
      sums_.push_back({std::move(names), std::vector<double>(static_cast<size_t>(host.cols)), 0});
    }
    return uploaded;
  }

  void linear(const WeightMatrix& w, const void* x, int64_t m, const void* bias, DType bias_dtype, void* y) override {
    if (auto it = index_.find(w.data); it != index_.end()) {
      Sums& s = sums_[it->second];
      const auto* in = static_cast<const float*>(x);  // host memory on the CPU backend
      for (int64_t r = 0; r < m; ++r)
        for (int64_t k = 0; k < w.cols; ++k) {
          const double v = in[r * w.cols + k];
          s.sum_sq[static_cast<size_t>(k)] += v * v;
        }
      s.rows_seen += m;
    }
    inner_.linear(w, x, m, bias, bias_dtype, y);
  }

  void embedding(const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n, bool accumulate,
                 void* out) override {
    inner_.embedding(table, table_dtype, dim, ids, n, accumulate, out);
  }
  void layer_norm(const void* x, int64_t m, int64_t n, const void* gamma, const void* beta, DType param_dtype,
                  float eps, void* y) override {
    inner_.layer_norm(x, m, n, gamma, beta, param_dtype, eps, y);
  }
  void rms_norm(const void* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps,
                void* y) override {
    inner_.rms_norm(x, m, n, gamma, param_dtype, eps, y);
  }
  void activation(Activation kind, void* x, int64_t count) override { inner_.activation(kind, x, count); }
  void gated_activation(Activation kind, const void* gate_up, int64_t m, int64_t n, void* out) override {
    inner_.gated_activation(kind, gate_up, m, n, out);
  }
  void add(void* x, const void* y, int64_t count) override { inner_.add(x, y, count); }
  void rotary(void* q, void* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads, int head_dim,
              int rotary_dim, const float* inv_freq) override {
    inner_.rotary(q, k, positions, n_tokens, n_heads, n_kv_heads, head_dim, rotary_dim, inv_freq);
  }
  void write_kv(const PagedAttention& p, const void* k, const void* v, void* k_cache, void* v_cache) override {
    inner_.write_kv(p, k, v, k_cache, v_cache);
  }
  void attention(const PagedAttention& p, const void* q, const void* k_cache, const void* v_cache,
                 void* out) override {
    inner_.attention(p, q, k_cache, v_cache, out);
  }
  void to_host_f32(const void* src, int64_t count, float* dst) override { inner_.to_host_f32(src, count, dst); }
  void moe_route(const void* router_logits, int64_t n_tokens, int n_experts, int top_k, int32_t* expert_ids,
                 float* weights) override {
    inner_.moe_route(router_logits, n_tokens, n_experts, top_k, expert_ids, weights);
  }
  void scatter_add_rows(const void* src, const int32_t* rows, const float* weights, int64_t n, int64_t dim, void* dst,
                        int64_t dst_rows) override {
    inner_.scatter_add_rows(src, rows, weights, n, dim, dst, dst_rows);
  }

 private:
  Backend& inner_;
  std::unordered_map<uint64_t, std::string> by_hash_;
  std::unordered_map<const void*, size_t> index_;
  std::vector<Sums> sums_;
};

// FNV-1a hash -> name of every dense 2-D ".weight" tensor of the checkpoint.
std::unordered_map<uint64_t, std::string> hash_weights(const fs::path& model_dir) {
  const ckpt::Checkpoint ckpt = ckpt::Checkpoint::open(model_dir);
  std::unordered_map<uint64_t, std::string> by_hash;
  for (const auto& file : ckpt.files()) {
    for (const ckpt::TensorInfo& t : file->tensors()) {
      const std::string_view name = t.name;
      if (t.shape.size() != 2 || !is_float(t.dtype) || !name.ends_with(".weight")) continue;
      const ckpt::TensorView v = file->view(t);
      // Two identical matrices (e.g. zero-initialised ones) cannot be told apart: neither gets statistics.
      auto [it, inserted] = by_hash.emplace(fnv1a(v.data, v.nbytes()), t.name);
      if (!inserted) it->second.clear();
      file->release(t);
    }
  }
  std::erase_if(by_hash, [](const auto& kv) { return kv.second.empty(); });
  return by_hash;
}

}  // namespace

ActivationStats collect_activation_stats(const fs::path& model_dir, const std::vector<int32_t>& all_ids,
                                         const CalibrationOptions& o) {
  std::vector<int32_t> ids = all_ids;
  if (o.max_tokens > 0 && static_cast<int64_t>(ids.size()) > o.max_tokens) ids.resize(static_cast<size_t>(o.max_tokens));
  if (ids.size() < 2) throw Error("calibration needs at least 2 tokens of text, got " + std::to_string(ids.size()));
  if (o.ctx < 2) throw Error("the calibration window must be at least 2 tokens");

  std::unique_ptr<Backend> cpu = make_cpu_backend();
  RecordingBackend recorder(*cpu, hash_weights(model_dir));
  std::unique_ptr<Model> model = load_model(model_dir, recorder);
  if (model->info().quantization != "none")
    throw Error("calibration runs the source model: " + model_dir.string() + " is already quantized");
  const int64_t vocab = model->info().vocab_size;
  for (const int32_t id : ids)
    if (id < 0 || id >= vocab)
      throw Error("calibration token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(vocab));

  const int ctx = static_cast<int>(std::min<int64_t>(o.ctx, model->info().max_context));
  constexpr int kBlock = 16;
  const int blocks = (ctx + kBlock - 1) / kBlock;
  model->allocate_kv_cache(blocks, kBlock);
  std::vector<float> logits(static_cast<size_t>(vocab));
  const auto n = static_cast<int64_t>(ids.size());
  for (int64_t begin = 0; begin < n; begin += ctx) {  // one sequence per window, from position 0
    const int64_t end = std::min<int64_t>(begin + ctx, n);
    StepInput s;
    s.token_ids.assign(ids.begin() + begin, ids.begin() + end);
    for (int64_t t = begin; t < end; ++t) s.positions.push_back(static_cast<int32_t>(t - begin));
    s.query_start = {0, static_cast<int32_t>(end - begin)};
    s.context_len = {static_cast<int32_t>(end - begin)};
    s.max_blocks = blocks;
    for (int b = 0; b < blocks; ++b) s.block_table.push_back(b);
    s.logit_rows = {static_cast<int32_t>(end - begin - 1)};
    model->forward(s, logits.data());
  }

  ActivationStats stats;
  stats.tokens = n;
  for (const Sums& s : recorder.sums()) {
    if (s.rows_seen == 0) continue;  // e.g. an MoE expert no calibration token was routed to
    std::vector<float> mean(s.sum_sq.size());
    for (size_t k = 0; k < mean.size(); ++k) mean[k] = static_cast<float>(s.sum_sq[k] / static_cast<double>(s.rows_seen));
    for (const std::string& name : s.names) stats.mean_sq[name] = mean;
  }
  return stats;
}

}  // namespace fineserve::quant
