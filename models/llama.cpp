#include "models/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

#include "kernels/base.h"
#include "kernels/half.h"
#include "models/mixtral.h"
#include "quant/quantizer.h"

namespace fineserve {
namespace {

float load_float(const std::byte* p, DType t, size_t i) {
  switch (t) {
    case DType::F32: {
      float v;
      std::memcpy(&v, p + 4 * i, 4);
      return v;
    }
    case DType::F16:
    case DType::BF16: {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      return t == DType::F16 ? half_to_float(v) : bf16_to_float(v);
    }
    default: FS_ASSERT(false, "not a float dtype");
  }
  return 0;
}

void append_f32(std::vector<float>& out, const void* data, DType t, size_t n) {
  const auto* p = static_cast<const std::byte*>(data);
  for (size_t i = 0; i < n; ++i) out.push_back(load_float(p, t, i));
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

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
  void* last;     // [L, hidden] hidden states of the logit rows
};

LlamaModel::Activations LlamaModel::activations(int n_tokens, int n_logits) {
  const size_t a = dtype_size(be_.act_dtype()), T = static_cast<size_t>(n_tokens), L = static_cast<size_t>(n_logits);
  const auto h = static_cast<size_t>(c_.hidden_size), head_dim = static_cast<size_t>(c_.head_dim);
  const size_t q_dim = static_cast<size_t>(heads_) * head_dim, kv_dim = static_cast<size_t>(kv_heads_) * head_dim;
  size_t scratch = 0;
  for (const LlamaLayer& Ly : w_.layers) scratch = std::max(scratch, Ly.ffn->scratch_bytes(n_tokens));
  return carve_in(arena_, [&](ScratchCarver& sc) {
    Activations b;
    b.h = sc.take(T * h * a);
    b.x = sc.take(T * h * a);
    b.q = sc.take(T * q_dim * a);
    b.k = sc.take(T * kv_dim * a);
    b.v = sc.take(T * kv_dim * a);
    b.attn = sc.take(T * q_dim * a);
    b.scratch = sc.take(scratch);
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
  const bool bias = c_.attention_bias;
  for (int64_t i = 0; i < c_.num_hidden_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LlamaLayer L;
    L.input_norm = ld.dense(p + "input_layernorm.weight", {h});
    L.q_proj = ld.linear(p + "self_attn.q_proj", q_dim, h, Parallel::Column);
    L.k_proj = ld.linear_part(p + "self_attn.k_proj", kv_dim, h, kv_part);
    L.v_proj = ld.linear_part(p + "self_attn.v_proj", kv_dim, h, kv_part);
    L.o_proj = ld.linear(p + "self_attn.o_proj", h, q_dim, Parallel::Row);
    if (bias) {
      L.q_bias = ld.dense_split(p + "self_attn.q_proj.bias", {q_dim});
      L.k_bias = ld.dense_part(p + "self_attn.k_proj.bias", {kv_dim}, kv_part);
      L.v_bias = ld.dense_part(p + "self_attn.v_proj.bias", {kv_dim}, kv_part);
      // Row-parallel: added once, by rank 0, before the all-reduce sums the ranks.
      if (shard_.rank == 0) L.o_bias = ld.dense(p + "self_attn.o_proj.bias", {h});
    }
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
  info_.quantization = ld.bits() ? "finequant-int" + std::to_string(ld.bits()) : "none";
  if (const auto eb = checkpoint_->metadata().find("expert_bits");
      ld.bits() && eb != checkpoint_->metadata().end() && eb->second != std::to_string(ld.bits()))
    info_.quantization += ",experts-int" + eb->second;  // quantize --expert-bits
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

// The halves are checked as WeightLoader::linear checks a matrix. Two quantized halves with the
// same bits but different group sizes are both stored at the finer group: a coarse scale repeated
// over its sub-groups dequantizes identically. A quantized half next to a dense one (a --keep
// pattern matching only one) or next to one of other bits is dequantized: the pair runs in fp32.
WeightMatrix load_stacked_linear(const LlamaLoadContext& ctx, const std::string& stem_a, const std::string& stem_b,
                                 int64_t rows, int64_t cols) {
  const int64_t f = rows, h = cols;
  const ckpt::Checkpoint& ck = ctx.checkpoint;
  const std::string where = "checkpoint " + ck.dir().string() + ": ";
  const std::string stems[2] = {ctx.prefix + stem_a, ctx.prefix + stem_b};

  struct Half {
    ckpt::TensorView w;       // .weight or .qweight
    ckpt::TensorView scales;  // quantized only
    int64_t group = 0;
    int bits = 0;
  };
  Half half[2];
  bool quantized[2];
  for (int i = 0; i < 2; ++i) {
    quantized[i] = ck.has(stems[i] + ".qweight");
    if (!quantized[i]) {
      half[i].w = ck.get(stems[i] + ".weight");
      if (half[i].w.shape() != std::vector<int64_t>{f, h} || !is_float(half[i].w.dtype()))
        throw Error(where + "tensor " + stems[i] + ".weight must be a float [" + std::to_string(f) + ", " +
                    std::to_string(h) + "] matrix as config.json implies, got " +
                    std::string(dtype_name(half[i].w.dtype())) + " " + shape_text(half[i].w.shape()));
      continue;
    }
    if (ctx.loader.bits() == 0) throw Error(where + stems[i] + ".qweight without FineQuant metadata");
    const int bits = ctx.loader.bits_of(i == 0 ? stem_a : stem_b);
    half[i].bits = bits;
    half[i].w = ck.get(stems[i] + ".qweight");
    half[i].scales = ck.get(stems[i] + ".scales");
    const auto& ss = half[i].scales.shape();
    if (ss.size() != 2 || ss[0] != f || ss[1] <= 0 || h % ss[1] != 0 || half[i].scales.dtype() != DType::F16)
      throw Error(where + stems[i] + ".scales must be fp16 [" + std::to_string(f) + ", K / group]");
    half[i].group = h / ss[1];
    if (!quant::is_allowed_group(h, half[i].group))
      throw Error(where + stems[i] + " has group " + std::to_string(half[i].group) +
                  ", not an allowed group size for K = " + std::to_string(h));
    const std::vector<int64_t> want = {f, bits == 4 ? h / 2 : h};
    if (half[i].w.shape() != want || half[i].w.dtype() != (bits == 4 ? DType::U8 : DType::I8))
      throw Error(where + stems[i] + ".qweight must be " + (bits == 4 ? "U8 [" : "I8 [") + std::to_string(want[0]) +
                  ", " + std::to_string(want[1]) + "]");
  }

  // This rank's rows of each half (column-parallel): [r0, r0 + n).
  const ShardSpec shard = ctx.loader.shard();
  if (f % shard.world != 0)
    throw Error("tensor parallelism: cannot split " + stems[0] + " and " + stems[1] + " across " +
                std::to_string(shard.world) + " ranks: their output dimension " + std::to_string(f) +
                " is not divisible by " + std::to_string(shard.world));
  const int64_t n = f / shard.world, r0 = shard.rank * n;
  struct Rows {
    const std::byte* codes;   // [n, row_bytes] codes or dense values
    size_t bytes;
    const std::byte* scales;  // [n, K / group] fp16 (quantized only)
  };
  Rows part[2];
  for (int i = 0; i < 2; ++i) {
    const Half& hf = half[i];
    const int64_t row_bytes = static_cast<int64_t>(hf.w.nbytes()) / f;
    part[i].codes = hf.w.data + r0 * row_bytes;
    part[i].bytes = static_cast<size_t>(n * row_bytes);
    part[i].scales = quantized[i] ? hf.scales.data + r0 * (h / hf.group) * 2 : nullptr;
  }

  WeightMatrix fused;
  fused.rows = 2 * n;
  fused.cols = h;
  std::vector<std::byte> data;
  std::vector<uint16_t> scales;
  if (quantized[0] && quantized[1] && half[0].bits == half[1].bits) {
    fused.bits = half[0].bits;
    fused.dtype = fused.bits == 4 ? DType::U8 : DType::I8;
    fused.group = std::min(half[0].group, half[1].group);
    const int64_t groups = h / fused.group;
    for (int i = 0; i < 2; ++i) {
      data.insert(data.end(), part[i].codes, part[i].codes + part[i].bytes);
      const int64_t repeat = half[i].group / fused.group, stored = h / half[i].group;
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < groups; ++g) {
          uint16_t s;
          std::memcpy(&s, part[i].scales + 2 * (r * stored + g / repeat), 2);
          scales.push_back(s);
        }
    }
    fused.scales = scales.data();
  } else if (!quantized[0] && !quantized[1] && half[0].w.dtype() == half[1].w.dtype()) {
    fused.dtype = half[0].w.dtype();
    for (const Rows& pr : part) data.insert(data.end(), pr.codes, pr.codes + pr.bytes);
  } else {
    std::vector<float> rows_f32;
    rows_f32.reserve(static_cast<size_t>(2 * n * h));
    for (int i = 0; i < 2; ++i) {
      if (!quantized[i]) {
        append_f32(rows_f32, part[i].codes, half[i].w.dtype(), static_cast<size_t>(n * h));
        continue;
      }
      quant::QuantizedMatrix q;
      q.rows = n;
      q.cols = h;
      q.bits = half[i].bits;
      q.group = half[i].group;
      q.codes.resize(part[i].bytes);
      std::memcpy(q.codes.data(), part[i].codes, part[i].bytes);
      q.scales.resize(static_cast<size_t>(n * (h / q.group)));
      std::memcpy(q.scales.data(), part[i].scales, q.scales.size() * 2);
      const std::vector<float> dense = quant::dequantize(q);
      rows_f32.insert(rows_f32.end(), dense.begin(), dense.end());
    }
    fused.dtype = DType::F32;
    data.resize(rows_f32.size() * 4);
    std::memcpy(data.data(), rows_f32.data(), data.size());
  }
  fused.data = data.data();
  return ctx.backend.upload_weight(fused);  // copies: `data` and `scales` may go
}

namespace {

Activation llama_activation(const std::string& hidden_act) {
  return hidden_act == "silu" ? Activation::SiLU : hidden_act == "gelu" ? Activation::GELU : Activation::GELUTanh;
}

// Llama's MLP (SwiGLU): down_proj(act(gate_proj(x)) * up_proj(x)), gate and up as one GEMM.
// Under tensor parallelism a rank holds ffn / world columns of gate and up and the same rows of
// down's K, and returns its partial sum.
class DenseMlp final : public LlamaFfn {
 public:
  DenseMlp(const LlamaLoadContext& ctx, const std::string& layer)
      : be_(ctx.backend), hidden_(ctx.config.hidden_size),
        ffn_(ctx.config.intermediate_size / ctx.loader.shard().world),
        act_(llama_activation(ctx.config.hidden_act)) {
    const ckpt::LlamaConfig& c = ctx.config;
    const ShardSpec shard = ctx.loader.shard();
    const std::string p = layer + "mlp.";
    gate_up_ = load_stacked_linear(ctx, p + "gate_proj", p + "up_proj", c.intermediate_size, hidden_);
    if (c.mlp_bias) {
      // [gate bias | up bias] in fp32, this rank's slice of each.
      std::vector<float> both;
      for (const char* part : {"gate_proj", "up_proj"}) {
        const std::string name = ctx.prefix + p + part + ".bias";
        const ckpt::TensorView t = ctx.checkpoint.get(name);
        if (t.shape() != std::vector<int64_t>{c.intermediate_size} || !is_float(t.dtype()))
          throw Error("checkpoint " + ctx.checkpoint.dir().string() + ": tensor " + name + " must be a float [" +
                      std::to_string(c.intermediate_size) + "] vector, got " + std::string(dtype_name(t.dtype())) +
                      " " + shape_text(t.shape()));
        const size_t first = static_cast<size_t>(shard.rank * ffn_) * dtype_size(t.dtype());
        append_f32(both, t.data + first, t.dtype(), static_cast<size_t>(ffn_));
      }
      gate_up_bias_ = {be_.upload(both.data(), both.size() * 4), DType::F32, {2 * ffn_}};
      // Row-parallel: added once, by rank 0, before the all-reduce sums the ranks.
      if (shard.rank == 0) down_bias_ = ctx.loader.dense(p + "down_proj.bias", {hidden_});
    }
    down_ = ctx.loader.linear(p + "down_proj", hidden_, c.intermediate_size, Parallel::Row);
  }

  size_t scratch_bytes(int64_t n_tokens) const override {
    ScratchCarver sc;
    carve(sc, n_tokens);
    return sc.used;
  }

  void forward(const void* x, int64_t n_tokens, void* out, const FfnWorkspace& ws) override {
    ScratchCarver sc{static_cast<char*>(ws.scratch)};
    const auto [gate_up, act] = carve(sc, n_tokens);
    be_.linear(gate_up_, x, n_tokens, gate_up_bias_.data, gate_up_bias_.dtype, gate_up);
    be_.gated_activation(act_, gate_up, n_tokens, ffn_, act);
    be_.linear(down_, act, n_tokens, down_bias_.data, down_bias_.dtype, out);
  }

  uint64_t weight_bytes() const override { return static_cast<uint64_t>(gate_up_.bytes() + down_.bytes()); }

 private:
  std::pair<void*, void*> carve(ScratchCarver& sc, int64_t n_tokens) const {
    const size_t a = dtype_size(be_.act_dtype()), T = static_cast<size_t>(n_tokens);
    void* gate_up = sc.take(T * 2 * static_cast<size_t>(ffn_) * a);  // [T, 2 * ffn]
    void* act = sc.take(T * static_cast<size_t>(ffn_) * a);          // [T, ffn]
    return {gate_up, act};
  }

  Backend& be_;
  const int64_t hidden_, ffn_;  // ffn: this rank's columns
  const Activation act_;
  WeightMatrix gate_up_;       // [2 * ffn, hidden]: gate_proj's rows, then up_proj's
  DeviceTensor gate_up_bias_;  // [2 * ffn] (mlp_bias)
  WeightMatrix down_;          // [hidden, ffn] row-parallel
  DeviceTensor down_bias_;     // [hidden] (rank 0 only)
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
  auto linear = [&](const WeightMatrix& w, const void* x, const DeviceTensor& bias, void* y) {
    be_.linear(w, x, T, bias.data, bias.dtype, y);
  };
  // Row-parallel layers leave a partial sum on each rank; the all-reduce completes it.
  auto all_reduce = [&](void* x) {
    if (shard_.world > 1) comm_->all_reduce_sum(x, T * h, be_.act_dtype());
  };
  const FfnWorkspace ws{b.scratch, &zeros_};

  be_.embedding(w_.embed_tokens.data, w_.embed_tokens.dtype, h, index_.token_ids(), T, false, b.h);
  for (size_t li = 0; li < w_.layers.size(); ++li) {
    const LlamaLayer& Ly = w_.layers[li];
    // Attention block: x = RMSNorm(h); h += o_proj(attention(rotary(q), rotary(k), v)).
    be_.rms_norm(b.h, T, h, Ly.input_norm.data, Ly.input_norm.dtype, eps, b.x);
    linear(Ly.q_proj, b.x, Ly.q_bias, b.q);
    linear(Ly.k_proj, b.x, Ly.k_bias, b.k);
    linear(Ly.v_proj, b.x, Ly.v_bias, b.v);
    be_.rotary(b.q, b.k, index_.positions(), T, pa.n_heads, pa.n_kv_heads, pa.head_dim, pa.head_dim, w_.inv_freq);
    be_.write_kv(pa, b.k, b.v, kv_->k(li), kv_->v(li));
    be_.attention(pa, b.q, kv_->k(li), kv_->v(li), b.attn);
    linear(Ly.o_proj, b.attn, Ly.o_bias, b.x);
    all_reduce(b.x);
    be_.add(b.h, b.x, T * h);

    // Feed-forward block: h += ffn(RMSNorm(h)), a SwiGLU MLP or a sparse mixture of them.
    be_.rms_norm(b.h, T, h, Ly.post_attn_norm.data, Ly.post_attn_norm.dtype, eps, b.x);
    Ly.ffn->forward(b.x, T, b.x, ws);
    all_reduce(b.x);
    be_.add(b.h, b.x, T * h);
  }
  // A replicated head runs only where logits are read; a vocab-parallel one on every rank.
  if (L == 0 || (logits == nullptr && !head_->vocab_parallel())) return;

  // Only the rows whose next token is wanted go through the final norm and the LM head.
  gather_logit_rows(be_, s, b.h, h, b.last);
  be_.rms_norm(b.last, L, h, w_.final_norm.data, w_.final_norm.dtype, eps, b.last);
  head_->forward(b.last, L, logits);
}

}  // namespace fineserve
