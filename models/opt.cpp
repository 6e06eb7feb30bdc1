#include "models/opt.h"

#include <cmath>
#include <cstring>

#include "kernels/base.h"
#include "models/opt_layout.h"
#include "models/registry.h"

namespace fineserve {

// The activations of one step (shapes per rank: h = this rank's heads * head_dim, f = its FFN
// columns), cut from one device buffer.
struct OptModel::Activations {
  void* h;     // [T, hidden] the residual stream
  void* x;     // [T, max(hidden, embed)] normed input / projection output
  void* emb;   // [T, embed] token embeddings before project_in
  void *q, *k, *v, *attn;  // [T, h]
  void* ffn;   // [T, f]
  void* last;  // [L, max(hidden, embed)] hidden states of the logit rows
};

OptModel::Activations OptModel::activations(int n_tokens, int n_logits) {
  const size_t a = dtype_size(be_.act_dtype()), T = static_cast<size_t>(n_tokens), L = static_cast<size_t>(n_logits);
  const auto hidden = static_cast<size_t>(c_.hidden_size), embed = static_cast<size_t>(c_.word_embed_proj_dim);
  const auto h = static_cast<size_t>(hidden_), f = static_cast<size_t>(ffn_);
  const size_t wide = std::max(hidden, embed);
  return carve_in(arena_, [&](ScratchCarver& sc) {
    Activations b;
    b.h = sc.take(T * hidden * a);
    b.x = sc.take(T * wide * a);
    b.emb = sc.take(T * embed * a);
    b.q = sc.take(T * h * a);
    b.k = sc.take(T * h * a);
    b.v = sc.take(T * h * a);
    b.attn = sc.take(T * h * a);
    b.ffn = sc.take(T * f * a);
    b.last = sc.take(L * wide * a);
    return b;
  });
}

OptModel::OptModel(std::unique_ptr<ckpt::Checkpoint> checkpoint, const ckpt::OptConfig& config, Backend& backend,
                   ShardSpec shard, Communicator* comm)
    : checkpoint_(std::move(checkpoint)), c_(config), be_(backend), shard_(shard), comm_(comm), arena_(backend),
      index_(backend) {
  const int64_t h = c_.hidden_size, e = c_.word_embed_proj_dim, f = c_.ffn_dim, vocab = c_.vocab_size;
  if (c_.activation_function != "relu" && c_.activation_function != "gelu")
    throw Error("OPT with activation '" + c_.activation_function + "' is not supported (relu, gelu)");
  const int world = shard_.world;
  FS_ASSERT(world >= 1 && shard_.rank >= 0 && shard_.rank < world);
  FS_ASSERT(world == 1 || (comm_ && comm_->world() == world && comm_->rank() == shard_.rank),
            "a sharded model needs the communicator of its rank");
  if (c_.num_attention_heads % world != 0)
    throw Error("tensor parallelism: OPT has " + std::to_string(c_.num_attention_heads) +
                " attention heads, which cannot be split evenly across " + std::to_string(world) +
                " ranks (the tensor-parallel size must divide the head count)");
  if (f % world != 0)
    throw Error("tensor parallelism: OPT's ffn_dim " + std::to_string(f) + " cannot be split evenly across " +
                std::to_string(world) + " ranks");
  heads_ = c_.num_attention_heads / world;
  hidden_ = heads_ * c_.head_dim();
  ffn_ = f / world;
  // Original fairseq conversions store "decoder.*"; save_pretrained stores "model.decoder.*".
  const bool hf_prefix = checkpoint_->has("model.decoder.embed_tokens.weight") ||
                         checkpoint_->has("model.decoder.embed_tokens.qweight");  // quantize --quantize-embeddings
  const std::string prefix = hf_prefix ? "model.decoder." : "decoder.";
  WeightLoader ld(*checkpoint_, be_, prefix, shard_);

  w_.embed_tokens = ld.embedding("embed_tokens", vocab, e);
  w_.embed_positions = ld.dense("embed_positions.weight", {c_.max_position_embeddings + ckpt::OptConfig::kPositionOffset, h});
  if (e != h) {
    w_.project_in = ld.linear("project_in", h, e);
    w_.project_out = ld.linear("project_out", e, h);
  }
  if (c_.has_final_layer_norm() && c_.layer_norm_elementwise_affine) {
    w_.final_ln_w = ld.dense("final_layer_norm.weight", {h});
    w_.final_ln_b = ld.dense("final_layer_norm.bias", {h});
  }
  auto bias = [&](const std::string& name, int64_t n) {
    return c_.enable_bias ? ld.dense(name, {n}) : DeviceTensor{};
  };
  // A column-parallel layer's bias: this rank's slice.
  auto bias_split = [&](const std::string& name, int64_t n) {
    return c_.enable_bias ? ld.dense_split(name, {n}) : DeviceTensor{};
  };
  // A row-parallel layer's bias: added once, by rank 0, before the all-reduce sums the ranks.
  auto bias_once = [&](const std::string& name, int64_t n) {
    return shard_.rank == 0 ? bias(name, n) : DeviceTensor{};
  };
  auto norm = [&](const std::string& name, DeviceTensor& wt, DeviceTensor& bs) {
    if (!c_.layer_norm_elementwise_affine) return;
    wt = ld.dense(name + ".weight", {h});
    bs = ld.dense(name + ".bias", {h});
  };
  for (int64_t i = 0; i < c_.num_hidden_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    OptLayer L;
    L.q_proj = ld.linear(p + "self_attn.q_proj", h, h, Parallel::Column);
    L.k_proj = ld.linear(p + "self_attn.k_proj", h, h, Parallel::Column);
    L.v_proj = ld.linear(p + "self_attn.v_proj", h, h, Parallel::Column);
    L.out_proj = ld.linear(p + "self_attn.out_proj", h, h, Parallel::Row);
    L.q_bias = bias_split(p + "self_attn.q_proj.bias", h);
    L.k_bias = bias_split(p + "self_attn.k_proj.bias", h);
    L.v_bias = bias_split(p + "self_attn.v_proj.bias", h);
    L.out_bias = bias_once(p + "self_attn.out_proj.bias", h);
    norm(p + "self_attn_layer_norm", L.attn_ln_w, L.attn_ln_b);
    L.fc1 = ld.linear(p + "fc1", f, h, Parallel::Column);
    L.fc1_bias = bias_split(p + "fc1.bias", f);
    L.fc2 = ld.linear(p + "fc2", h, f, Parallel::Row);
    L.fc2_bias = bias_once(p + "fc2.bias", h);
    norm(p + "final_layer_norm", L.ffn_ln_w, L.ffn_ln_b);
    w_.layers.push_back(L);
  }
  // The LM head: a stored lm_head when the checkpoint has an untied one, else the embedding.
  const bool untied = !c_.tie_word_embeddings && (checkpoint_->has("lm_head.weight") || checkpoint_->has("lm_head.qweight"));
  head_ = std::make_unique<LmHead>(*checkpoint_, be_, untied ? "lm_head" : prefix + "embed_tokens", vocab, e, shard_, comm_);

  info_.architecture = "opt";
  info_.quantization = ld.quantization_name();
  info_.source_format = ld.source_format();
  info_.vocab_size = vocab;
  info_.max_context = c_.max_position_embeddings;
  info_.n_layers = static_cast<int>(c_.num_hidden_layers);
  info_.n_kv_heads = static_cast<int>(c_.num_attention_heads);  // the model's (a rank caches n / world)
  info_.head_dim = static_cast<int>(c_.head_dim());
  info_.bos_token_id = c_.bos_token_id;
  info_.eos_token_id = c_.eos_token_id;
  info_.weight_bytes = ld.bytes_loaded() + head_->bytes();  // this rank's
  kv_ = std::make_unique<PagedKvCache>(be_, c_.num_hidden_layers, hidden_);
}

OptModel::~OptModel() = default;

void OptModel::forward(const StepInput& s, float* logits) {
  const int T = s.n_tokens(), L = static_cast<int>(s.logit_rows.size());
  FS_ASSERT(kv_->block_size() > 0, "forward before allocate_kv_cache");
  index_.upload(s, c_.max_position_embeddings, c_.vocab_size, static_cast<int32_t>(ckpt::OptConfig::kPositionOffset));
  const Activations b = activations(T, std::max(L, 1));
  const int64_t h = c_.hidden_size, e = c_.word_embed_proj_dim;

  PagedAttention pa = index_.attention(s, kv_->block_size());
  pa.n_heads = pa.n_kv_heads = static_cast<int>(heads_);
  pa.head_dim = static_cast<int>(c_.head_dim());
  pa.scale = 1.0f / std::sqrt(static_cast<float>(pa.head_dim));

  // Embeddings: tokens (projected in when the dims differ) plus learned positions.
  if (e != h) {
    be_.embedding(w_.embed_tokens.data, w_.embed_tokens.dtype, e, index_.token_ids(), T, false, b.emb);
    be_.linear(w_.project_in, b.emb, T, b.h);
  } else {
    be_.embedding(w_.embed_tokens.data, w_.embed_tokens.dtype, e, index_.token_ids(), T, false, b.h);
  }
  be_.embedding(w_.embed_positions.data, w_.embed_positions.dtype, h, index_.positions(), T, true, b.h);

  const float eps = 1e-5f;
  const Activation act = ckpt::activation_from_hf_name(c_.activation_function);
  // Without elementwise_affine the norm weights are empty: the backend's gamma 1, beta 0.
  auto layer_norm = [&](const DeviceTensor& g, const DeviceTensor& beta, const void* in, void* out) {
    be_.layer_norm(in, T, h, g, beta, eps, out);
  };
  // Row-parallel layers leave a partial sum on each rank; the all-reduce completes it.
  auto all_reduce = [&](void* x) {
    if (shard_.world > 1) comm_->all_reduce_sum(x, T * h, be_.act_dtype());
  };
  for (size_t li = 0; li < w_.layers.size(); ++li) {
    const OptLayer& Ly = w_.layers[li];
    // Self-attention block.
    const void* attn_in = b.h;
    if (c_.do_layer_norm_before) {
      layer_norm(Ly.attn_ln_w, Ly.attn_ln_b, b.h, b.x);
      attn_in = b.x;
    }
    be_.linear(Ly.q_proj, attn_in, T, Ly.q_bias, b.q);
    be_.linear(Ly.k_proj, attn_in, T, Ly.k_bias, b.k);
    be_.linear(Ly.v_proj, attn_in, T, Ly.v_bias, b.v);
    be_.write_kv(pa, b.k, b.v, kv_->k(li), kv_->v(li));
    be_.attention(pa, b.q, kv_->k(li), kv_->v(li), b.attn);
    be_.linear(Ly.out_proj, b.attn, T, Ly.out_bias, b.x);
    all_reduce(b.x);
    be_.add(b.h, b.x, T * h);
    if (!c_.do_layer_norm_before) layer_norm(Ly.attn_ln_w, Ly.attn_ln_b, b.h, b.h);

    // MLP block.
    const void* mlp_in = b.h;
    if (c_.do_layer_norm_before) {
      layer_norm(Ly.ffn_ln_w, Ly.ffn_ln_b, b.h, b.x);
      mlp_in = b.x;
    }
    be_.linear(Ly.fc1, mlp_in, T, Ly.fc1_bias, b.ffn);
    be_.activation(act, b.ffn, T * ffn_);
    be_.linear(Ly.fc2, b.ffn, T, Ly.fc2_bias, b.x);
    all_reduce(b.x);
    be_.add(b.h, b.x, T * h);
    if (!c_.do_layer_norm_before) layer_norm(Ly.ffn_ln_w, Ly.ffn_ln_b, b.h, b.h);
  }
  // A replicated head runs only where logits are read; a vocab-parallel one on every rank.
  if (L == 0 || (logits == nullptr && !head_->vocab_parallel())) return;

  // Only the rows whose next token is wanted go through the final norm and the LM head.
  gather_logit_rows(be_, s, b.h, h, b.last);
  if (w_.final_ln_w.data || c_.has_final_layer_norm())
    be_.layer_norm(b.last, L, h, w_.final_ln_w, w_.final_ln_b, eps, b.last);
  const void* head_in = b.last;
  if (e != h) {
    be_.linear(w_.project_out, b.last, L, b.x);
    head_in = b.x;
  }
  head_->forward(head_in, L, logits);
}

const Architecture kOptArchitecture = {
    .shape = [](const nlohmann::json& config, const std::string& source) {
      const ckpt::OptConfig c = ckpt::parse_opt_config(config, source);
      // The LM head is tied to the embedding.
      return ArchitectureShape{.hidden_size = c.hidden_size,
                               .n_layers = c.num_hidden_layers,
                               .n_kv_heads = c.num_attention_heads,
                               .head_dim = c.head_dim(),
                               .tied_head_elements = c.vocab_size * c.word_embed_proj_dim};
    },
    .tensor_specs = [](const nlohmann::json& config, const std::string& source) {
      return opt_tensor_specs(ckpt::parse_opt_config(config, source));
    },
    .load = [](std::unique_ptr<ckpt::Checkpoint> checkpoint, const nlohmann::json& config, const std::string& source,
               Backend& backend, ShardSpec shard, Communicator* comm) -> std::unique_ptr<Model> {
      return std::make_unique<OptModel>(std::move(checkpoint), ckpt::parse_opt_config(config, source), backend, shard,
                                        comm);
    },
};

}  // namespace fineserve
