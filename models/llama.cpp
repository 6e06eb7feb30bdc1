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

// Activation and index buffers on the device, grown to the largest step seen.
struct LlamaModel::Buffers {
  Backend& be;
  int tokens = 0, logits = 0;
  void* h = nullptr;        // [T, hidden] the residual stream
  void* x = nullptr;        // [T, hidden] normed input / projection output
  void* q = nullptr;        // [T, heads * head_dim]
  void *k = nullptr, *v = nullptr;  // [T, kv_heads * head_dim]
  void* attn = nullptr;     // [T, heads * head_dim]
  void* scratch = nullptr;  // the FFNs' working memory (LlamaFfn::scratch_bytes)
  void* last = nullptr;     // [L, hidden] hidden states of the logit rows
  void* out = nullptr;      // [L, vocab]
  int32_t *ids = nullptr, *pos = nullptr, *qstart = nullptr, *ctx = nullptr, *table = nullptr;
  size_t table_cap = 0, seq_cap = 0;

  explicit Buffers(Backend& b) : be(b) {}
  ~Buffers() {
    release();
    release_index();
  }
  void release() {
    for (void* p : {h, x, q, k, v, attn, scratch, last, out, static_cast<void*>(ids), static_cast<void*>(pos)})
      if (p) be.free(p);
    h = x = q = k = v = attn = scratch = last = out = nullptr;
    ids = pos = nullptr;
  }
  void release_index() {
    for (void* p : {static_cast<void*>(qstart), static_cast<void*>(ctx), static_cast<void*>(table)})
      if (p) be.free(p);
    qstart = ctx = table = nullptr;
  }
};

LlamaModel::LlamaModel(std::unique_ptr<ckpt::Checkpoint> checkpoint, const ckpt::LlamaConfig& config,
                       Backend& backend)
    : checkpoint_(std::move(checkpoint)), c_(config), be_(backend), buf_(std::make_unique<Buffers>(backend)) {
  const int64_t h = c_.hidden_size, vocab = c_.vocab_size;
  const int64_t q_dim = c_.num_attention_heads * c_.head_dim, kv_dim = c_.num_key_value_heads * c_.head_dim;
  WeightLoader ld(*checkpoint_, be_, "model.");
  const LlamaLoadContext ctx{*checkpoint_, ld, be_, c_};

  w_.embed_tokens = ld.dense("embed_tokens.weight", {vocab, h});
  w_.final_norm = ld.dense("norm.weight", {h});
  auto bias = [&](bool present, const std::string& name, int64_t n) {
    return present ? ld.dense(name, {n}) : DeviceTensor{};
  };
  for (int64_t i = 0; i < c_.num_hidden_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LlamaLayer L;
    L.input_norm = ld.dense(p + "input_layernorm.weight", {h});
    L.q_proj = ld.linear(p + "self_attn.q_proj", q_dim, h);
    L.k_proj = ld.linear(p + "self_attn.k_proj", kv_dim, h);
    L.v_proj = ld.linear(p + "self_attn.v_proj", kv_dim, h);
    L.o_proj = ld.linear(p + "self_attn.o_proj", h, q_dim);
    L.q_bias = bias(c_.attention_bias, p + "self_attn.q_proj.bias", q_dim);
    L.k_bias = bias(c_.attention_bias, p + "self_attn.k_proj.bias", kv_dim);
    L.v_bias = bias(c_.attention_bias, p + "self_attn.v_proj.bias", kv_dim);
    L.o_bias = bias(c_.attention_bias, p + "self_attn.o_proj.bias", h);
    L.post_attn_norm = ld.dense(p + "post_attention_layernorm.weight", {h});
    L.ffn = c_.is_moe() ? load_sparse_moe(ctx, p) : load_dense_mlp(ctx, p);
    w_.layers.push_back(std::move(L));
  }
  WeightLoader root(*checkpoint_, be_, "");
  if (!c_.tie_word_embeddings) {
    w_.lm_head = root.linear("lm_head", vocab, h);
  } else {
    // The host copy of the embedding (upload_weight takes host memory).
    const ckpt::TensorView e = checkpoint_->get("model.embed_tokens.weight");
    WeightMatrix tied;
    tied.rows = vocab;
    tied.cols = h;
    tied.dtype = e.dtype();
    tied.data = e.data;
    w_.lm_head = be_.upload_weight(tied);
  }
  const std::vector<float> inv_freq = llama_inv_freq(c_);
  w_.inv_freq = static_cast<const float*>(be_.upload(inv_freq.data(), inv_freq.size() * 4));

  info_.architecture = c_.model_type;
  info_.quantization = ld.bits() ? "finequant-int" + std::to_string(ld.bits()) : "none";
  if (const auto eb = checkpoint_->metadata().find("expert_bits");
      ld.bits() && eb != checkpoint_->metadata().end() && eb->second != std::to_string(ld.bits()))
    info_.quantization += ",experts-int" + eb->second;  // quantize --expert-bits
  info_.vocab_size = vocab;
  info_.max_context = c_.max_position_embeddings;
  info_.n_layers = static_cast<int>(c_.num_hidden_layers);
  info_.n_kv_heads = static_cast<int>(c_.num_key_value_heads);
  info_.head_dim = static_cast<int>(c_.head_dim);
  info_.bos_token_id = c_.bos_token_id;
  info_.eos_token_id = c_.eos_token_ids.empty() ? -1 : c_.eos_token_ids.front();
  uint64_t bytes = static_cast<uint64_t>(w_.lm_head.bytes());
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

  WeightMatrix fused;
  fused.rows = 2 * f;
  fused.cols = h;
  std::vector<std::byte> data;
  std::vector<uint16_t> scales;
  if (quantized[0] && quantized[1] && half[0].bits == half[1].bits) {
    fused.bits = half[0].bits;
    fused.dtype = fused.bits == 4 ? DType::U8 : DType::I8;
    fused.group = std::min(half[0].group, half[1].group);
    const int64_t groups = h / fused.group;
    for (const Half& hf : half) {
      const auto* codes = hf.w.data;
      data.insert(data.end(), codes, codes + hf.w.nbytes());
      const int64_t repeat = hf.group / fused.group, stored = h / hf.group;
      for (int64_t r = 0; r < f; ++r)
        for (int64_t g = 0; g < groups; ++g) {
          uint16_t s;
          std::memcpy(&s, hf.scales.data + 2 * (r * stored + g / repeat), 2);
          scales.push_back(s);
        }
    }
    fused.scales = scales.data();
  } else if (!quantized[0] && !quantized[1] && half[0].w.dtype() == half[1].w.dtype()) {
    fused.dtype = half[0].w.dtype();
    for (const Half& hf : half) data.insert(data.end(), hf.w.data, hf.w.data + hf.w.nbytes());
  } else {
    std::vector<float> rows_f32;
    rows_f32.reserve(static_cast<size_t>(2 * f * h));
    for (int i = 0; i < 2; ++i) {
      if (!quantized[i]) {
        append_f32(rows_f32, half[i].w.data, half[i].w.dtype(), static_cast<size_t>(f * h));
        continue;
      }
      quant::QuantizedMatrix q;
      q.rows = f;
      q.cols = h;
      q.bits = half[i].bits;
      q.group = half[i].group;
      q.codes.resize(half[i].w.nbytes());
      std::memcpy(q.codes.data(), half[i].w.data, half[i].w.nbytes());
      q.scales.resize(static_cast<size_t>(half[i].scales.numel()));
      std::memcpy(q.scales.data(), half[i].scales.data, half[i].scales.nbytes());
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
class DenseMlp final : public LlamaFfn {
 public:
  DenseMlp(const LlamaLoadContext& ctx, const std::string& layer)
      : be_(ctx.backend), hidden_(ctx.config.hidden_size), ffn_(ctx.config.intermediate_size),
        act_(llama_activation(ctx.config.hidden_act)) {
    const ckpt::LlamaConfig& c = ctx.config;
    const std::string p = layer + "mlp.";
    gate_up_ = load_stacked_linear(ctx, p + "gate_proj", p + "up_proj", ffn_, hidden_);
    if (c.mlp_bias) {
      // [gate bias | up bias] in fp32.
      std::vector<float> both;
      for (const char* part : {"gate_proj", "up_proj"}) {
        const std::string name = ctx.prefix + p + part + ".bias";
        const ckpt::TensorView t = ctx.checkpoint.get(name);
        if (t.shape() != std::vector<int64_t>{ffn_} || !is_float(t.dtype()))
          throw Error("checkpoint " + ctx.checkpoint.dir().string() + ": tensor " + name + " must be a float [" +
                      std::to_string(ffn_) + "] vector, got " + std::string(dtype_name(t.dtype())) + " " +
                      shape_text(t.shape()));
        append_f32(both, t.data, t.dtype(), static_cast<size_t>(ffn_));
      }
      gate_up_bias_ = {be_.upload(both.data(), both.size() * 4), DType::F32, {2 * ffn_}};
      down_bias_ = ctx.loader.dense(p + "down_proj.bias", {hidden_});
    }
    down_ = ctx.loader.linear(p + "down_proj", hidden_, ffn_);
  }

  size_t scratch_bytes(int64_t n_tokens) const override {
    ScratchCarver sc;
    carve(sc, n_tokens);
    return sc.used;
  }

  void forward(void* x, int64_t n_tokens, void* h, void* scratch) override {
    ScratchCarver sc{static_cast<char*>(scratch)};
    const auto [gate_up, act] = carve(sc, n_tokens);
    be_.linear(gate_up_, x, n_tokens, gate_up_bias_.data, gate_up_bias_.dtype, gate_up);
    be_.gated_activation(act_, gate_up, n_tokens, ffn_, act);
    be_.linear(down_, act, n_tokens, down_bias_.data, down_bias_.dtype, x);
    be_.add(h, x, n_tokens * hidden_);
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
  const int64_t hidden_, ffn_;
  const Activation act_;
  WeightMatrix gate_up_;       // [2 * ffn, hidden]: gate_proj's rows, then up_proj's
  DeviceTensor gate_up_bias_;  // [2 * ffn] (mlp_bias)
  WeightMatrix down_;          // [hidden, ffn]
  DeviceTensor down_bias_;     // [hidden]
};

}  // namespace

std::unique_ptr<LlamaFfn> load_dense_mlp(const LlamaLoadContext& ctx, const std::string& layer) {
  return std::make_unique<DenseMlp>(ctx, layer);
}

LlamaModel::~LlamaModel() { free_kv_cache(); }

void LlamaModel::free_kv_cache() {
  for (void* p : k_cache_) be_.free(p);
  for (void* p : v_cache_) be_.free(p);
  k_cache_.clear();
  v_cache_.clear();
}

uint64_t LlamaModel::kv_block_bytes(int block_size) const {
  return 2ull * static_cast<uint64_t>(c_.num_hidden_layers) * static_cast<uint64_t>(block_size) *
         static_cast<uint64_t>(c_.num_key_value_heads * c_.head_dim) * dtype_size(be_.act_dtype());
}

void LlamaModel::allocate_kv_cache(int num_blocks, int block_size) {
  FS_ASSERT(num_blocks > 0 && block_size > 0);
  free_kv_cache();
  const size_t bytes = kv_block_bytes(block_size) / 2 / static_cast<size_t>(c_.num_hidden_layers) *
                       static_cast<size_t>(num_blocks);
  for (int64_t i = 0; i < c_.num_hidden_layers; ++i) {
    k_cache_.push_back(be_.alloc(bytes));
    v_cache_.push_back(be_.alloc(bytes));
  }
  block_size_ = block_size;
}

void LlamaModel::ensure_buffers(int n_tokens, int n_logits) {
  Buffers& b = *buf_;
  if (n_tokens <= b.tokens && n_logits <= b.logits) return;
  b.release();
  b.tokens = std::max(n_tokens, b.tokens);
  b.logits = std::max(n_logits, b.logits);
  const size_t a = dtype_size(be_.act_dtype());
  const auto T = static_cast<size_t>(b.tokens), L = static_cast<size_t>(b.logits);
  const auto h = static_cast<size_t>(c_.hidden_size);
  const auto q_dim = static_cast<size_t>(c_.num_attention_heads * c_.head_dim);
  const auto kv_dim = static_cast<size_t>(c_.num_key_value_heads * c_.head_dim);
  b.h = be_.alloc(T * h * a);
  b.x = be_.alloc(T * h * a);
  b.q = be_.alloc(T * q_dim * a);
  b.k = be_.alloc(T * kv_dim * a);
  b.v = be_.alloc(T * kv_dim * a);
  b.attn = be_.alloc(T * q_dim * a);
  size_t scratch = 0;
  for (const LlamaLayer& Ly : w_.layers) scratch = std::max(scratch, Ly.ffn->scratch_bytes(b.tokens));
  b.scratch = be_.alloc(std::max<size_t>(scratch, 1));
  b.last = be_.alloc(L * h * a);
  b.out = be_.alloc(L * static_cast<size_t>(c_.vocab_size) * a);
  b.ids = static_cast<int32_t*>(be_.alloc(T * 4));
  b.pos = static_cast<int32_t*>(be_.alloc(T * 4));
}

void LlamaModel::forward(const StepInput& s, float* logits) {
  const int T = s.n_tokens(), S = s.n_seqs(), L = static_cast<int>(s.logit_rows.size());
  FS_ASSERT(T > 0 && S > 0 && block_size_ > 0, "forward before allocate_kv_cache or on an empty step");
  FS_ASSERT(static_cast<int>(s.query_start.size()) == S + 1 && static_cast<int>(s.positions.size()) == T);
  for (int32_t p : s.positions)
    if (p < 0 || p >= c_.max_position_embeddings)
      throw Error("position " + std::to_string(p) + " is past the model's context of " +
                  std::to_string(c_.max_position_embeddings));
  for (int32_t id : s.token_ids)
    if (id < 0 || id >= c_.vocab_size)
      throw Error("token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(c_.vocab_size));
  ensure_buffers(T, std::max(L, 1));
  Buffers& b = *buf_;
  const size_t a = dtype_size(be_.act_dtype());
  const int64_t h = c_.hidden_size;

  // Index arrays to the device.
  be_.copy_to_device(b.ids, s.token_ids.data(), static_cast<size_t>(T) * 4);
  be_.copy_to_device(b.pos, s.positions.data(), static_cast<size_t>(T) * 4);
  if (b.seq_cap < static_cast<size_t>(S + 1) || b.table_cap < s.block_table.size()) {
    b.release_index();
    b.seq_cap = static_cast<size_t>(S + 1);
    b.table_cap = std::max<size_t>(s.block_table.size(), 1);
    b.qstart = static_cast<int32_t*>(be_.alloc(b.seq_cap * 4));
    b.ctx = static_cast<int32_t*>(be_.alloc(b.seq_cap * 4));
    b.table = static_cast<int32_t*>(be_.alloc(b.table_cap * 4));
  }
  be_.copy_to_device(b.qstart, s.query_start.data(), s.query_start.size() * 4);
  be_.copy_to_device(b.ctx, s.context_len.data(), s.context_len.size() * 4);
  be_.copy_to_device(b.table, s.block_table.data(), s.block_table.size() * 4);

  PagedAttention pa;
  pa.n_heads = static_cast<int>(c_.num_attention_heads);
  pa.n_kv_heads = static_cast<int>(c_.num_key_value_heads);
  pa.head_dim = static_cast<int>(c_.head_dim);
  pa.scale = 1.0f / std::sqrt(static_cast<float>(pa.head_dim));
  pa.sliding_window = static_cast<int>(std::min<int64_t>(c_.sliding_window, INT32_MAX));
  pa.block_size = block_size_;
  pa.n_seqs = S;
  pa.max_blocks = s.max_blocks;
  pa.query_start = b.qstart;
  pa.context_len = b.ctx;
  pa.block_table = b.table;

  const float eps = static_cast<float>(c_.rms_norm_eps);
  auto linear = [&](const WeightMatrix& w, const void* x, const DeviceTensor& bias, void* y) {
    be_.linear(w, x, T, bias.data, bias.dtype, y);
  };

  be_.embedding(w_.embed_tokens.data, w_.embed_tokens.dtype, h, b.ids, T, false, b.h);
  for (size_t li = 0; li < w_.layers.size(); ++li) {
    const LlamaLayer& Ly = w_.layers[li];
    // Attention block: x = RMSNorm(h); h += o_proj(attention(rotary(q), rotary(k), v)).
    be_.rms_norm(b.h, T, h, Ly.input_norm.data, Ly.input_norm.dtype, eps, b.x);
    linear(Ly.q_proj, b.x, Ly.q_bias, b.q);
    linear(Ly.k_proj, b.x, Ly.k_bias, b.k);
    linear(Ly.v_proj, b.x, Ly.v_bias, b.v);
    be_.rotary(b.q, b.k, b.pos, T, pa.n_heads, pa.n_kv_heads, pa.head_dim, pa.head_dim, w_.inv_freq);
    be_.write_kv(pa, b.k, b.v, k_cache_[li], v_cache_[li]);
    be_.attention(pa, b.q, k_cache_[li], v_cache_[li], b.attn);
    linear(Ly.o_proj, b.attn, Ly.o_bias, b.x);
    be_.add(b.h, b.x, T * h);

    // Feed-forward block: h += ffn(RMSNorm(h)), a SwiGLU MLP or a sparse mixture of them.
    be_.rms_norm(b.h, T, h, Ly.post_attn_norm.data, Ly.post_attn_norm.dtype, eps, b.x);
    Ly.ffn->forward(b.x, T, b.h, b.scratch);
  }
  if (L == 0) return;

  // Only the rows whose next token is wanted go through the final norm and the LM head.
  for (int i = 0; i < L; ++i) {
    FS_ASSERT(s.logit_rows[i] >= 0 && s.logit_rows[i] < T);
    be_.copy(static_cast<char*>(b.last) + static_cast<size_t>(i) * h * a,
             static_cast<const char*>(b.h) + static_cast<size_t>(s.logit_rows[i]) * h * a, h * a);
  }
  be_.rms_norm(b.last, L, h, w_.final_norm.data, w_.final_norm.dtype, eps, b.last);
  be_.linear(w_.lm_head, b.last, L, nullptr, DType::F16, b.out);
  be_.to_host_f32(b.out, static_cast<int64_t>(L) * c_.vocab_size, logits);
}

}  // namespace fineserve
