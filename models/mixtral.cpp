#include "models/mixtral.h"

#include <algorithm>

#include "kernels/base.h"

namespace fineserve {
namespace {

// Shapes per rank: ffn = this rank's columns (intermediate_size / world).
struct Expert {
  WeightMatrix gate_up;  // [2 * ffn, hidden]: w1's rows (gate), then w3's (up), column-parallel
  WeightMatrix down;     // [hidden, ffn] w2, row-parallel
};

class SparseMoe final : public LlamaFfn {
 public:
  SparseMoe(const LlamaLoadContext& ctx, const std::string& layer)
      : be_(ctx.backend),
        hidden_(ctx.config.hidden_size),
        ffn_(ctx.config.intermediate_size / ctx.loader.shard().world),
        n_experts_(static_cast<int>(ctx.config.num_local_experts)),
        top_k_(static_cast<int>(ctx.config.num_experts_per_tok)) {
    FS_ASSERT(ctx.config.is_moe() && top_k_ >= 1 && top_k_ <= n_experts_);
    act_ = ckpt::activation_from_hf_name(ctx.config.hidden_act);
    const std::string p = layer + "block_sparse_moe.";
    const int64_t ffn = ctx.config.intermediate_size;  // the model's; a rank holds ffn_ of it
    router_ = ctx.loader.linear(p + "gate", n_experts_, hidden_);  // replicated
    for (int e = 0; e < n_experts_; ++e) {
      const std::string x = p + "experts." + std::to_string(e) + ".";
      Expert ex;
      ex.gate_up = ctx.loader.stacked_linear(x + "w1", x + "w3", ffn, hidden_);
      ex.down = ctx.loader.linear(x + "w2", hidden_, ffn, Parallel::Row);
      experts_.push_back(ex);
    }
  }

  size_t scratch_bytes(int64_t n_tokens) const override {
    ScratchCarver sc;
    carve(sc, n_tokens);
    return sc.used;
  }

  void forward(const void* x, int64_t n_tokens, void* out, const FfnWorkspace& ws) override {
    ScratchCarver sc{static_cast<char*>(ws.scratch)};
    const Scratch s = carve(sc, n_tokens);
    const int64_t T = n_tokens, n = T * top_k_;
    const size_t a = dtype_size(be_.act_dtype());

    // Route: router logits [T, n_experts] -> top_k experts and weights per token.
    be_.linear(router_, x, T, s.logits);
    be_.moe_route(s.logits, T, n_experts_, top_k_, s.expert_ids, s.weights);
    ids_.resize(static_cast<size_t>(n));
    weights_.resize(static_cast<size_t>(n));
    be_.copy_to_host(ids_.data(), s.expert_ids, static_cast<size_t>(n) * 4);
    be_.copy_to_host(weights_.data(), s.weights, static_cast<size_t>(n) * 4);

    // Plan: the assignments sorted by expert (tokens in order within one, as HF's index_add), so
    // expert e's rows are [offsets[e], offsets[e + 1]).
    offsets_.assign(static_cast<size_t>(n_experts_) + 1, 0);
    for (int32_t e : ids_) {
      FS_ASSERT(e >= 0 && e < n_experts_, "moe_route returned an expert out of range");
      ++offsets_[static_cast<size_t>(e) + 1];
    }
    for (int e = 0; e < n_experts_; ++e) offsets_[static_cast<size_t>(e) + 1] += offsets_[static_cast<size_t>(e)];
    rows_.resize(static_cast<size_t>(n));
    row_weights_.resize(static_cast<size_t>(n));
    std::vector<int64_t>& next = cursor_;
    next.assign(offsets_.begin(), offsets_.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t slot = next[static_cast<size_t>(ids_[static_cast<size_t>(i)])]++;
      rows_[static_cast<size_t>(slot)] = static_cast<int32_t>(i / top_k_);
      row_weights_[static_cast<size_t>(slot)] = weights_[static_cast<size_t>(i)];
    }
    be_.copy_to_device(s.rows, rows_.data(), static_cast<size_t>(n) * 4);
    be_.copy_to_device(s.row_weights, row_weights_.data(), static_cast<size_t>(n) * 4);

    // Gather every assignment's input row (the embedding op is a row gather; x is read for the
    // last time, so out may be x), then per expert: out[rows] += w · w2(act(w1 x) * w3 x) over its
    // contiguous block of rows, into an out that starts at zero (the backend has no fill op: a
    // device copy from a zero buffer shared by the layers clears it).
    be_.embedding(x, be_.act_dtype(), hidden_, s.rows, n, false, s.gathered);
    const size_t out_bytes = static_cast<size_t>(T * hidden_) * a;
    be_.copy(out, ws.zeros->reserve_zeroed(out_bytes), out_bytes);
    for (int e = 0; e < n_experts_; ++e) {
      const int64_t begin = offsets_[static_cast<size_t>(e)], m = offsets_[static_cast<size_t>(e) + 1] - begin;
      if (m == 0) continue;
      const Expert& ex = experts_[static_cast<size_t>(e)];
      be_.linear(ex.gate_up, static_cast<const char*>(s.gathered) + static_cast<size_t>(begin * hidden_) * a, m,
                 s.gate_up);
      be_.gated_activation(act_, s.gate_up, m, ffn_, s.act);
      be_.linear(ex.down, s.act, m, s.expert_out);
      be_.scatter_add_rows(s.expert_out, s.rows + begin, s.row_weights + begin, m, hidden_, out, T);
    }
  }

  // The router, and on average top_k of the n_experts experts per token.
  uint64_t weight_bytes() const override {
    uint64_t experts = 0;
    for (const Expert& ex : experts_) experts += static_cast<uint64_t>(ex.gate_up.bytes() + ex.down.bytes());
    return static_cast<uint64_t>(router_.bytes()) + experts * static_cast<uint64_t>(top_k_) / static_cast<uint64_t>(n_experts_);
  }

 private:
  struct Scratch {
    void* logits;          // [T, n_experts]
    int32_t* expert_ids;   // [T, top_k]
    float* weights;        // [T, top_k]
    int32_t* rows;         // [T * top_k] the token of each assignment, grouped by expert
    float* row_weights;    // [T * top_k] its router weight
    void* gathered;        // [T * top_k, hidden] the input rows in that order
    void* gate_up;         // [T, 2 * ffn] one expert's [gate | up] (an expert gets <= T rows)
    void* act;             // [T, ffn]
    void* expert_out;      // [T, hidden] one expert's output rows
  };

  Scratch carve(ScratchCarver& sc, int64_t n_tokens) const {
    const size_t a = dtype_size(be_.act_dtype()), T = static_cast<size_t>(n_tokens);
    const size_t n = T * static_cast<size_t>(top_k_), h = static_cast<size_t>(hidden_), f = static_cast<size_t>(ffn_);
    Scratch s{};
    s.logits = sc.take(T * static_cast<size_t>(n_experts_) * a);
    s.expert_ids = static_cast<int32_t*>(sc.take(n * 4));
    s.weights = static_cast<float*>(sc.take(n * 4));
    s.rows = static_cast<int32_t*>(sc.take(n * 4));
    s.row_weights = static_cast<float*>(sc.take(n * 4));
    s.gathered = sc.take(n * h * a);
    s.gate_up = sc.take(T * 2 * f * a);
    s.act = sc.take(T * f * a);
    s.expert_out = sc.take(T * h * a);
    return s;
  }

  Backend& be_;
  const int64_t hidden_, ffn_;  // ffn: this rank's columns of every expert
  const int n_experts_, top_k_;
  Activation act_;
  WeightMatrix router_;  // [n_experts, hidden], 16-bit as stored
  std::vector<Expert> experts_;
  // The host-side plan, kept to reuse its memory across steps.
  std::vector<int32_t> ids_, rows_;
  std::vector<float> weights_, row_weights_;
  std::vector<int64_t> offsets_, cursor_;
};

}  // namespace

std::unique_ptr<LlamaFfn> load_sparse_moe(const LlamaLoadContext& ctx, const std::string& layer) {
  return std::make_unique<SparseMoe>(ctx, layer);
}

}  // namespace fineserve
