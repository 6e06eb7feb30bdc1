#include "models/llama.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <tuple>

#include "kernels/base.h"
#include "kernels/cpu/convert.h"
#include "models/llama_layout.h"
#include "models/mixtral.h"
#include "models/registry.h"

namespace fineserve {

std::vector<float> llama_inv_freq(const ckpt::LlamaConfig& c) {
  const int64_t d = c.head_dim;
  const ckpt::RopeScaling& s = c.rope_scaling;
  std::vector<float> inv(static_cast<size_t>(d / 2));
  for (int64_t i = 0; i < d / 2; ++i) {
    // HF: 1 / base^(arange(0, d, 2) / d), in fp32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(d);
    double f = 1.0 / std::pow(static_cast<double>(static_cast<float>(c.rope_theta)), static_cast<double>(exponent));
    if (s.type == "linear") {
      f /= s.factor;
    } else if (s.type == "llama3") {
      // Llama 3.1: long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and
      // the band between interpolated smoothly (transformers' _compute_llama3_parameters).
      const double old_ctx = static_cast<double>(s.original_max_position_embeddings);
      const double low_wavelen = old_ctx / s.low_freq_factor, high_wavelen = old_ctx / s.high_freq_factor;
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f /= s.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1 - smooth) * f / s.factor + smooth * f;
      }
    }
    inv[static_cast<size_t>(i)] = static_cast<float>(f);
  }
  return inv;
}

// The activations of one step (shapes per rank: q_dim = this rank's heads * head_dim, kv_dim its
// KV heads * head_dim), cut from one device buffer.
struct LlamaModel::Activations {
  void* h;        // [T, hidden] the residual stream
  void* x;        // [T, hidden] normed input / block output
  void* q;        // [T, q_dim]
  void *k, *v;    // [T, kv_dim]
  void* attn;     // [T, q_dim]
  void* scratch;  // the FFNs' working memory (LlamaFfn::scratch_bytes)
  void* gathered; // [T, max K of a gathered input] (activation order only)
  void* last;     // [L, hidden] hidden states of the logit rows
};

LlamaModel::Activations LlamaModel::activations(int n_tokens, int n_logits) {
  const size_t a = dtype_size(be_.act_dtype()), T = static_cast<size_t>(n_tokens), L = static_cast<size_t>(n_logits);
  const auto h = static_cast<size_t>(c_.hidden_size), head_dim = static_cast<size_t>(c_.head_dim);
  const size_t q_dim = static_cast<size_t>(heads_) * head_dim, kv_dim = static_cast<size_t>(kv_heads_) * head_dim;
  size_t scratch = 0, gathered = 0;
  for (const LlamaLayer& Ly : w_.layers) {
    scratch = std::max(scratch, Ly.ffn->scratch_bytes(n_tokens));
    for (const auto* g : {Ly.q_gather.get(), Ly.k_gather.get(), Ly.v_gather.get(), Ly.o_gather.get()})
      if (g) gathered = std::max(gathered, T * static_cast<size_t>(g->k()) * a);
  }
  return carve_in(arena_, [&](ScratchCarver& sc) {
    Activations b;
    b.h = sc.take(T * h * a);
    b.x = sc.take(T * h * a);
    b.q = sc.take(T * q_dim * a);
    b.k = sc.take(T * kv_dim * a);
    b.v = sc.take(T * kv_dim * a);
    b.attn = sc.take(T * q_dim * a);
    b.scratch = sc.take(scratch);
    b.gathered = sc.take(gathered);
    b.last = sc.take(L * h * a);
    return b;
  });
}

LlamaModel::LlamaModel(std::unique_ptr<ckpt::Checkpoint> checkpoint, const ckpt::LlamaConfig& config,
                       Backend& backend, ShardSpec shard, Communicator* comm)
    : checkpoint_(std::move(checkpoint)), c_(config), be_(backend), shard_(shard), comm_(comm), arena_(backend),
      zeros_(backend), index_(backend) {
  const int64_t h = c_.hidden_size, vocab = c_.vocab_size, hd = c_.head_dim, f = c_.intermediate_size;
  const int64_t n_heads = c_.num_attention_heads, n_kv = c_.num_key_value_heads;
  const int world = shard_.world;
  FS_ASSERT(world >= 1 && shard_.rank >= 0 && shard_.rank < world);
  FS_ASSERT(world == 1 || (comm_ && comm_->world() == world && comm_->rank() == shard_.rank),
            "a sharded model needs the communicator of its rank");
  const std::string tp = "tensor parallelism: " + c_.model_type;
  const std::string ranks = std::to_string(world) + " ranks";
  if (n_heads % world != 0)
    throw Error(tp + " has " + std::to_string(n_heads) + " attention heads, which cannot be split evenly across " +
                ranks + " (the tensor-parallel size must divide the head count)");
  if (n_kv >= world ? n_kv % world != 0 : world % n_kv != 0)
    throw Error(tp + " has " + std::to_string(n_kv) + " key/value heads, which cannot be split evenly across " + ranks +
                " (the tensor-parallel size must divide the KV-head count, or be a multiple of it so that ranks "
                "share KV heads)");
  if (f % world != 0)
    throw Error(tp + "'s " + (c_.is_moe() ? "expert FFN width" : "FFN width") + " (intermediate_size) " +
                std::to_string(f) + " cannot be split evenly across " + ranks);
  // The K/V projections are cut into kv_parts parts: one per rank, or, with fewer KV heads than
  // ranks, one per KV head, each held by the world / n_kv ranks whose query heads read it.
  const int kv_parts = static_cast<int>(std::min<int64_t>(n_kv, world));
  const ShardSpec kv_part{shard_.rank * kv_parts / world, kv_parts};
  heads_ = static_cast<int>(n_heads / world);
  kv_heads_ = static_cast<int>(n_kv / kv_parts);
  const int64_t q_dim = n_heads * hd, kv_dim = n_kv * hd;  // the model's (WeightLoader cuts them)

  WeightLoader ld(*checkpoint_, be_, "model.", shard_);
  const LlamaLoadContext ctx{*checkpoint_, ld, be_, c_};
  w_.embed_tokens = ld.embedding("embed_tokens", vocab, h);
  w_.final_norm = ld.dense("norm.weight", {h});
  const bool qkv_bias = c_.attention_bias || c_.qkv_bias;  // Qwen2: q/k/v only
  for (int64_t i = 0; i < c_.num_hidden_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LlamaLayer L;
    L.input_norm = ld.dense(p + "input_layernorm.weight", {h});
    ld.accept_input_order(true);  // the attention block gathers its inputs (models/llama_act_order.h)
    L.q_proj = ld.linear(p + "self_attn.q_proj", q_dim, h, Parallel::Column);
    L.k_proj = ld.linear_part(p + "self_attn.k_proj", kv_dim, h, kv_part);
    L.v_proj = ld.linear_part(p + "self_attn.v_proj", kv_dim, h, kv_part);
    L.o_proj = ld.linear(p + "self_attn.o_proj", h, q_dim, Parallel::Row);
    ld.accept_input_order(false);
    std::vector<std::shared_ptr<InputGather>> qkv_gathers;  // distinct orders of q, k, v
    auto gather_for = [&](const std::string& stem) -> std::shared_ptr<InputGather> {
      std::vector<int32_t> order = ld.input_order(p + stem);
      if (order.empty()) return nullptr;
      for (const auto& g : qkv_gathers)
        if (g->order() == order) return g;
      return qkv_gathers.emplace_back(std::make_shared<InputGather>(be_, std::move(order)));
    };
    L.q_gather = gather_for("self_attn.q_proj");
    L.k_gather = gather_for("self_attn.k_proj");
    L.v_gather = gather_for("self_attn.v_proj");
    if (auto o_order = ld.input_order(p + "self_attn.o_proj"); !o_order.empty())
      L.o_gather = std::make_shared<InputGather>(be_, std::move(o_order));
    if (qkv_bias) {
      L.q_bias = ld.dense_split(p + "self_attn.q_proj.bias", {q_dim});
      L.k_bias = ld.dense_part(p + "self_attn.k_proj.bias", {kv_dim}, kv_part);
      L.v_bias = ld.dense_part(p + "self_attn.v_proj.bias", {kv_dim}, kv_part);
    }
    // Row-parallel: added once, by rank 0, before the all-reduce sums the ranks.
    if (c_.attention_bias && shard_.rank == 0) L.o_bias = ld.dense(p + "self_attn.o_proj.bias", {h});
    L.post_attn_norm = ld.dense(p + "post_attention_layernorm.weight", {h});
    L.ffn = c_.is_moe() ? load_sparse_moe(ctx, p) : load_dense_mlp(ctx, p);
    w_.layers.push_back(std::move(L));
  }
  head_ = std::make_unique<LmHead>(*checkpoint_, be_, c_.tie_word_embeddings ? "model.embed_tokens" : "lm_head",
                                   vocab, h, shard_, comm_);
  const std::vector<float> inv_freq = llama_inv_freq(c_);
  w_.inv_freq = static_cast<const float*>(be_.upload(inv_freq.data(), inv_freq.size() * 4));
  kv_ = std::make_unique<PagedKvCache>(be_, c_.num_hidden_layers, static_cast<int64_t>(kv_heads_) * hd);

  info_.architecture = c_.model_type;
  info_.quantization = ld.quantization_name();
  info_.source_format = ld.source_format();
  info_.vocab_size = vocab;
  info_.max_context = c_.max_position_embeddings;
  info_.n_layers = static_cast<int>(c_.num_hidden_layers);
  info_.n_kv_heads = static_cast<int>(n_kv);  // the model's (a rank caches kv_heads_ of them)
  info_.head_dim = static_cast<int>(hd);
  info_.bos_token_id = c_.bos_token_id;
  info_.eos_token_id = c_.eos_token_ids.empty() ? -1 : c_.eos_token_ids.front();
  uint64_t bytes = head_->bytes();  // this rank's
  for (const LlamaLayer& L : w_.layers)
    bytes += static_cast<uint64_t>(L.q_proj.bytes() + L.k_proj.bytes() + L.v_proj.bytes() + L.o_proj.bytes()) +
             L.ffn->weight_bytes();
  info_.weight_bytes = bytes;
}

namespace {

// Llama's MLP (SwiGLU): down_proj(act(gate_proj(x)) * up_proj(x)), gate and up as one GEMM.
// Under tensor parallelism a rank holds ffn / world columns of gate and up and the same rows of
// down's K, and returns its partial sum.
class DenseMlp final : public LlamaFfn {
 public:
  DenseMlp(const LlamaLoadContext& ctx, const std::string& layer)
      : be_(ctx.backend), hidden_(ctx.config.hidden_size),
        ffn_(ctx.config.intermediate_size / ctx.loader.shard().world),
        act_(ckpt::activation_from_hf_name(ctx.config.hidden_act)) {
    const ckpt::LlamaConfig& c = ctx.config;
    const ShardSpec shard = ctx.loader.shard();
    const std::string p = layer + "mlp.";
    ctx.loader.accept_input_order(true);  // gathered below (models/llama_act_order.h)
    gate_up_ = ctx.loader.stacked_linear(p + "gate_proj", p + "up_proj", c.intermediate_size, hidden_);
    if (auto order = ctx.loader.input_order(p + "gate_proj"); !order.empty())
      gate_up_gather_ = std::make_unique<InputGather>(be_, std::move(order));
    if (c.mlp_bias) {
      // [gate bias | up bias] in fp32, this rank's slice of each.
      std::vector<float> both(static_cast<size_t>(2 * ffn_));
      for (int half = 0; half < 2; ++half) {
        const std::string name = ctx.prefix + p + (half == 0 ? "gate_proj" : "up_proj") + ".bias";
        const ckpt::TensorView t = ctx.checkpoint.get(name);
        if (t.shape() != std::vector<int64_t>{c.intermediate_size} || !is_float(t.dtype()))
          throw Error("checkpoint " + ctx.checkpoint.dir().string() + ": tensor " + name + " must be a float [" +
                      std::to_string(c.intermediate_size) + "] vector, got " + std::string(dtype_name(t.dtype())) +
                      " " + ckpt::format_shape(t.shape()));
        const size_t first = static_cast<size_t>(shard.rank * ffn_) * dtype_size(t.dtype());
        cpu::to_f32(t.data + first, t.dtype(), ffn_, both.data() + half * ffn_);
      }
      gate_up_bias_ = {be_.upload(both.data(), both.size() * 4), DType::F32, {2 * ffn_}};
      // Row-parallel: added once, by rank 0, before the all-reduce sums the ranks.
      if (shard.rank == 0) down_bias_ = ctx.loader.dense(p + "down_proj.bias", {hidden_});
    }
    down_ = ctx.loader.linear(p + "down_proj", hidden_, c.intermediate_size, Parallel::Row);
    ctx.loader.accept_input_order(false);
    if (auto order = ctx.loader.input_order(p + "down_proj"); !order.empty())
      down_gather_ = std::make_unique<InputGather>(be_, std::move(order));
  }

  size_t scratch_bytes(int64_t n_tokens) const override {
    ScratchCarver sc;
    carve(sc, n_tokens);
    return sc.used;
  }

  void forward(const void* x, int64_t n_tokens, void* out, const FfnWorkspace& ws) override {
    ScratchCarver sc{static_cast<char*>(ws.scratch)};
    const auto [gate_up, act, gathered] = carve(sc, n_tokens);
    const void* gate_up_in = x;
    if (gate_up_gather_) {
      gate_up_gather_->forward(x, n_tokens, gathered);
      gate_up_in = gathered;
    }
    be_.linear(gate_up_, gate_up_in, n_tokens, gate_up_bias_, gate_up);
    be_.gated_activation(act_, gate_up, n_tokens, ffn_, act);
    const void* down_in = act;
    if (down_gather_) {
      down_gather_->forward(act, n_tokens, gathered);
      down_in = gathered;
    }
    be_.linear(down_, down_in, n_tokens, down_bias_, out);
  }

  uint64_t weight_bytes() const override { return static_cast<uint64_t>(gate_up_.bytes() + down_.bytes()); }

 private:
  std::tuple<void*, void*, void*> carve(ScratchCarver& sc, int64_t n_tokens) const {
    const size_t a = dtype_size(be_.act_dtype()), T = static_cast<size_t>(n_tokens);
    void* gate_up = sc.take(T * 2 * static_cast<size_t>(ffn_) * a);  // [T, 2 * ffn]
    void* act = sc.take(T * static_cast<size_t>(ffn_) * a);          // [T, ffn]
    size_t gathered_k = 0;  // [T, K] of the largest gathered input (activation order only)
    if (gate_up_gather_) gathered_k = static_cast<size_t>(hidden_);
    if (down_gather_) gathered_k = std::max(gathered_k, static_cast<size_t>(down_gather_->k()));
    void* gathered = sc.take(T * gathered_k * a);
    return {gate_up, act, gathered};
  }

  Backend& be_;
  const int64_t hidden_, ffn_;  // ffn: this rank's columns
  const Activation act_;
  WeightMatrix gate_up_;       // [2 * ffn, hidden]: gate_proj's rows, then up_proj's
  DeviceTensor gate_up_bias_;  // [2 * ffn] (mlp_bias)
  WeightMatrix down_;          // [hidden, ffn] row-parallel
  DeviceTensor down_bias_;     // [hidden] (rank 0 only)
  std::unique_ptr<InputGather> gate_up_gather_, down_gather_;  // activation order only
};

}  // namespace

std::unique_ptr<LlamaFfn> load_dense_mlp(const LlamaLoadContext& ctx, const std::string& layer) {
  return std::make_unique<DenseMlp>(ctx, layer);
}

LlamaModel::~LlamaModel() = default;

void LlamaModel::forward(const StepInput& s, float* logits) {
  const int T = s.n_tokens(), L = static_cast<int>(s.logit_rows.size());
  FS_ASSERT(kv_->block_size() > 0, "forward before allocate_kv_cache");
  index_.upload(s, c_.max_position_embeddings, c_.vocab_size);
  const Activations b = activations(T, std::max(L, 1));
  const int64_t h = c_.hidden_size;

  PagedAttention pa = index_.attention(s, kv_->block_size());
  pa.n_heads = heads_;
  pa.n_kv_heads = kv_heads_;
  pa.head_dim = static_cast<int>(c_.head_dim);
  pa.scale = 1.0f / std::sqrt(static_cast<float>(pa.head_dim));
  pa.sliding_window = static_cast<int>(std::min<int64_t>(c_.sliding_window, INT32_MAX));

  const float eps = static_cast<float>(c_.rms_norm_eps);
  // Row-parallel layers leave a partial sum on each rank; the all-reduce completes it.
  auto all_reduce = [&](void* x) {
    if (shard_.world > 1) comm_->all_reduce_sum(x, T * h, be_.act_dtype());
  };
  const FfnWorkspace ws{b.scratch, &zeros_};

  be_.embedding(w_.embed_tokens.data, w_.embed_tokens.dtype, h, index_.token_ids(), T, false, b.h);
  for (size_t li = 0; li < w_.layers.size(); ++li) {
    const LlamaLayer& Ly = w_.layers[li];
    // Attention block: x = RMSNorm(h); h += o_proj(attention(rotary(q), rotary(k), v)).
    be_.rms_norm(b.h, T, h, Ly.input_norm, eps, b.x);
    // x as each projection reads it: itself, or gathered in the projection's order (once per order).
    const InputGather* gathered_as = nullptr;
    auto input = [&](const std::shared_ptr<InputGather>& g, const void* x) -> const void* {
      if (!g) return x;
      if (gathered_as != g.get()) g->forward(x, T, b.gathered);
      gathered_as = g.get();
      return b.gathered;
    };
    be_.linear(Ly.q_proj, input(Ly.q_gather, b.x), T, Ly.q_bias, b.q);
    be_.linear(Ly.k_proj, input(Ly.k_gather, b.x), T, Ly.k_bias, b.k);
    be_.linear(Ly.v_proj, input(Ly.v_gather, b.x), T, Ly.v_bias, b.v);
    be_.rotary(b.q, b.k, index_.positions(), T, pa.n_heads, pa.n_kv_heads, pa.head_dim, pa.head_dim, w_.inv_freq);
    be_.write_kv(pa, b.k, b.v, kv_->k(li), kv_->v(li));
    be_.attention(pa, b.q, kv_->k(li), kv_->v(li), b.attn);
    gathered_as = nullptr;  // a new input
    be_.linear(Ly.o_proj, input(Ly.o_gather, b.attn), T, Ly.o_bias, b.x);
    all_reduce(b.x);
    be_.add(b.h, b.x, T * h);

    // Feed-forward block: h += ffn(RMSNorm(h)), a SwiGLU MLP or a sparse mixture of them.
    be_.rms_norm(b.h, T, h, Ly.post_attn_norm, eps, b.x);
    Ly.ffn->forward(b.x, T, b.x, ws);
    all_reduce(b.x);
    be_.add(b.h, b.x, T * h);
  }
  // A replicated head runs only where logits are read; a vocab-parallel one on every rank.
  if (L == 0 || (logits == nullptr && !head_->vocab_parallel())) return;

  // Only the rows whose next token is wanted go through the final norm and the LM head.
  gather_logit_rows(be_, s, b.h, h, b.last);
  be_.rms_norm(b.last, L, h, w_.final_norm, eps, b.last);
  head_->forward(b.last, L, logits);
}

const Architecture kLlamaArchitecture = {
    .shape = [](const nlohmann::json& config, const std::string& source) {
      const ckpt::LlamaConfig c = ckpt::parse_llama_config(config, source);
      return ArchitectureShape{.hidden_size = c.hidden_size,
                               .n_layers = c.num_hidden_layers,
                               .n_kv_heads = c.num_key_value_heads,
                               .head_dim = c.head_dim,
                               .tied_head_elements = c.tie_word_embeddings ? c.vocab_size * c.hidden_size : 0};
    },
    .tensor_specs = [](const nlohmann::json& config, const std::string& source) {
      return llama_tensor_specs(ckpt::parse_llama_config(config, source));
    },
    .load = [](std::unique_ptr<ckpt::Checkpoint> checkpoint, const nlohmann::json& config, const std::string& source,
               Backend& backend, ShardSpec shard, Communicator* comm) -> std::unique_ptr<Model> {
      return std::make_unique<LlamaModel>(std::move(checkpoint), ckpt::parse_llama_config(config, source), backend,
                                          shard, comm);
    },
};

}  // namespace fineserve
