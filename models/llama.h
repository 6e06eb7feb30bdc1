// Llama (Touvron et al. 2023), Mistral (Jiang et al. 2023) and Mixtral (Jiang et al. 2024), as
// Hugging Face's LlamaForCausalLM, MistralForCausalLM and MixtralForCausalLM: pre-RMSNorm decoder
// layers, rotary position embeddings (with linear or Llama-3 frequency scaling), grouped-query
// attention (optionally over a sliding window), a feed-forward block that is a SwiGLU MLP (Llama,
// Mistral) or a sparse mixture of SwiGLU experts (Mixtral, models/mixtral.h), and an LM head tied
// to the token embedding or not.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "models/weights.h"

namespace fineserve {

// The feed-forward half of a decoder layer, chosen at load time: Llama's dense SwiGLU MLP or
// Mixtral's sparse mixture of SwiGLU experts (models/mixtral.h). The layer loop calls forward
// without knowing which one it runs.
class LlamaFfn {
 public:
  virtual ~LlamaFfn() = default;
  // h[n_tokens, hidden] += ffn(x[n_tokens, hidden]); x may be overwritten. `scratch` is device
  // memory of at least scratch_bytes(n_tokens) bytes, shared by every layer.
  virtual void forward(void* x, int64_t n_tokens, void* h, void* scratch) = 0;
  virtual size_t scratch_bytes(int64_t n_tokens) const = 0;
  // Weight bytes one decode step of one token reads (a sparse FFN: its top_k experts' share).
  virtual uint64_t weight_bytes() const = 0;
};

// Cuts a scratch buffer into 64-byte-aligned pieces; with a null base it only adds up the sizes,
// so that one layout function serves both scratch_bytes and forward.
struct ScratchCarver {
  char* base = nullptr;
  size_t used = 0;
  void* take(size_t bytes) {
    void* p = base ? base + used : nullptr;
    used += (bytes + 63) / 64 * 64;
    return p;
  }
};

// What an FFN needs to load its weights: tensors are named relative to `prefix` ("model.").
struct LlamaLoadContext {
  const ckpt::Checkpoint& checkpoint;
  WeightLoader& loader;  // its prefix is `prefix`
  Backend& backend;
  const ckpt::LlamaConfig& config;
  std::string prefix = "model.";
};

// Two linear weights of the same input stacked into one [2 * rows, cols] matrix (`stem_a`'s rows,
// then `stem_b`'s), so that one GEMM computes both: SwiGLU's [gate | up]. Checked as
// WeightLoader::linear checks a matrix; see the definition for mixed groups and precisions.
WeightMatrix load_stacked_linear(const LlamaLoadContext& ctx, const std::string& stem_a, const std::string& stem_b,
                                 int64_t rows, int64_t cols);

// Llama's SwiGLU MLP of the layer whose tensors start with `layer` ("layers.3."): gate_proj,
// up_proj, down_proj (and their biases when mlp_bias).
std::unique_ptr<LlamaFfn> load_dense_mlp(const LlamaLoadContext& ctx, const std::string& layer);

struct LlamaLayer {
  DeviceTensor input_norm;        // [hidden] input_layernorm
  WeightMatrix q_proj;            // [heads * head_dim, hidden]
  WeightMatrix k_proj, v_proj;    // [kv_heads * head_dim, hidden]
  DeviceTensor q_bias;            // [heads * head_dim] (attention_bias)
  DeviceTensor k_bias, v_bias;    // [kv_heads * head_dim]
  WeightMatrix o_proj;            // [hidden, heads * head_dim]
  DeviceTensor o_bias;            // [hidden]
  DeviceTensor post_attn_norm;    // [hidden] post_attention_layernorm
  std::unique_ptr<LlamaFfn> ffn;  // dense SwiGLU MLP or sparse MoE
};

struct LlamaWeights {
  DeviceTensor embed_tokens;  // [vocab, hidden]
  DeviceTensor final_norm;    // [hidden] model.norm
  WeightMatrix lm_head;       // [vocab, hidden], the embedding when tied
  const float* inv_freq = nullptr;  // [head_dim / 2] rotary inverse frequencies, scaling applied
  std::vector<LlamaLayer> layers;
};

// The rotary inverse frequencies theta^(-2i/d), i < d/2, with the config's rope scaling applied
// (linear: divided by the factor; llama3: Llama 3.1's wavelength-dependent scaling), as HF computes
// them in fp32.
std::vector<float> llama_inv_freq(const ckpt::LlamaConfig& c);

class LlamaModel : public Model {
 public:
  LlamaModel(std::unique_ptr<ckpt::Checkpoint> checkpoint, const ckpt::LlamaConfig& config, Backend& backend);
  ~LlamaModel() override;

  const ModelInfo& info() const override { return info_; }
  void allocate_kv_cache(int num_blocks, int block_size) override;
  uint64_t kv_block_bytes(int block_size) const override;
  void forward(const StepInput& step, float* logits) override;

 private:
  struct Buffers;
  void ensure_buffers(int n_tokens, int n_logits);
  void free_kv_cache();

  std::unique_ptr<ckpt::Checkpoint> checkpoint_;  // the mapped weights the backend may point into
  ckpt::LlamaConfig c_;
  Backend& be_;
  LlamaWeights w_;
  ModelInfo info_;
  std::vector<void*> k_cache_, v_cache_;  // per layer [num_blocks, block_size, kv_heads, head_dim]
  int block_size_ = 0;
  std::unique_ptr<Buffers> buf_;
};

}  // namespace fineserve
