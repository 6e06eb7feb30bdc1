// Llama (Touvron et al. 2023), Mistral (Jiang et al. 2023), Mixtral (Jiang et al. 2024) and Qwen2
// (Yang et al. 2024), as Hugging Face's LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM
// and Qwen2ForCausalLM (Llama with q/k/v biases and no o_proj bias): pre-RMSNorm decoder
// layers, rotary position embeddings (with linear or Llama-3 frequency scaling), grouped-query
// attention (optionally over a sliding window), a feed-forward block that is a SwiGLU MLP (Llama,
// Mistral) or a sparse mixture of SwiGLU experts (Mixtral, models/mixtral.h), and an LM head tied
// to the token embedding or not.
//
// Tensor parallelism (Megatron, DESIGN): given a ShardSpec and a communicator, a rank holds
// n_heads / world query heads and the KV heads they read: n_kv_heads / world of them, or, when
// there are fewer KV heads than ranks (world a multiple of n_kv_heads), the one KV head its query
// heads share, replicated on world / n_kv_heads ranks. q/k/v and gate/up (each expert's w1/w3) are
// column-parallel (whole heads / a slice of the FFN per rank, biases split with them); o_proj and
// down (each expert's w2) are row-parallel, and each block ends in one all-reduce of the
// [T, hidden] partial sums; their biases live on rank 0 only, so the sum adds them once. The
// embeddings, norms and MoE router are replicated (every rank routes alike); the LM head is
// vocab-parallel when the vocabulary divides by the world size (models/lm_head.h). Rotary and
// the sliding window act per head and are unchanged; a rank's KV cache holds its KV heads only.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kernels/communicator.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/llama_act_order.h"
#include "models/lm_head.h"
#include "models/model.h"
#include "models/step_buffers.h"
#include "models/weights.h"

namespace fineserve {

// Device memory the FFNs of a model share (one layer runs at a time).
struct FfnWorkspace {
  void* scratch = nullptr;        // scratch_bytes(n_tokens) bytes, contents undefined
  DeviceBuffer* zeros = nullptr;  // read-only zeros, grown on demand (DeviceBuffer::reserve_zeroed)
};

// The feed-forward half of a decoder layer, chosen at load time: Llama's dense SwiGLU MLP or
// Mixtral's sparse mixture of SwiGLU experts (models/mixtral.h). The layer loop calls forward
// without knowing which one it runs.
class LlamaFfn {
 public:
  virtual ~LlamaFfn() = default;
  // out[n_tokens, hidden] = ffn(x[n_tokens, hidden]); out may be x. Under tensor parallelism it is
  // this rank's partial sum (row-parallel down projections), which the caller all-reduces.
  virtual void forward(const void* x, int64_t n_tokens, void* out, const FfnWorkspace& ws) = 0;
  virtual size_t scratch_bytes(int64_t n_tokens) const = 0;
  // Weight bytes (this rank's) one decode step of one token reads (a sparse FFN: its top_k
  // experts' share).
  virtual uint64_t weight_bytes() const = 0;
};

// What an FFN needs to load its weights: tensors are named relative to `prefix` ("model.").
struct LlamaLoadContext {
  const ckpt::Checkpoint& checkpoint;
  WeightLoader& loader;  // its prefix is `prefix`; its shard() is this rank's
  Backend& backend;
  const ckpt::LlamaConfig& config;
  std::string prefix = "model.";
};

// Llama's SwiGLU MLP of the layer whose tensors start with `layer` ("layers.3."): gate_proj,
// up_proj, down_proj (and their biases when mlp_bias); gate/up column-parallel, down row-parallel.
std::unique_ptr<LlamaFfn> load_dense_mlp(const LlamaLoadContext& ctx, const std::string& layer);

// Shapes per rank: heads and kv_heads are this rank's (the model's without tensor parallelism).
struct LlamaLayer {
  DeviceTensor input_norm;        // [hidden] input_layernorm
  WeightMatrix q_proj;            // [heads * head_dim, hidden] column-parallel
  WeightMatrix k_proj, v_proj;    // [kv_heads * head_dim, hidden] column-parallel
  DeviceTensor q_bias;            // [heads * head_dim] (attention_bias or qkv_bias)
  DeviceTensor k_bias, v_bias;    // [kv_heads * head_dim]
  WeightMatrix o_proj;            // [hidden, heads * head_dim] row-parallel
  DeviceTensor o_bias;            // [hidden] (attention_bias; rank 0 only)
  DeviceTensor post_attn_norm;    // [hidden] post_attention_layernorm
  // Activation order (models/llama_act_order.h): the inputs of q/k/v and o_proj gathered in their
  // matrices' K order; null for matrices in plain order. Projections whose orders are equal (GPTQ's
  // q/k/v, quantized from the same inputs) share one gather, which then runs once.
  std::shared_ptr<InputGather> q_gather, k_gather, v_gather, o_gather;
  std::unique_ptr<LlamaFfn> ffn;  // dense SwiGLU MLP or sparse MoE
};

struct LlamaWeights {
  DeviceTensor embed_tokens;  // [vocab, hidden]
  DeviceTensor final_norm;    // [hidden] model.norm
  const float* inv_freq = nullptr;  // [head_dim / 2] rotary inverse frequencies, scaling applied
  std::vector<LlamaLayer> layers;
};

// The rotary inverse frequencies theta^(-2i/d), i < d/2, with the config's rope scaling applied
// (linear: divided by the factor; llama3: Llama 3.1's wavelength-dependent scaling), as HF computes
// them in fp32.
std::vector<float> llama_inv_freq(const ckpt::LlamaConfig& c);

class LlamaModel : public Model {
 public:
  // `comm` (world = shard.world, rank = shard.rank) must outlive the model; it may be null when
  // shard.world == 1. Throws fineserve::Error when the heads, the KV heads or the FFN (each
  // expert's) width, or a FineQuant matrix's groups, cannot be split across shard.world ranks.
  LlamaModel(std::unique_ptr<ckpt::Checkpoint> checkpoint, const ckpt::LlamaConfig& config, Backend& backend,
             ShardSpec shard = {}, Communicator* comm = nullptr);
  ~LlamaModel() override;

  const ModelInfo& info() const override { return info_; }
  void allocate_kv_cache(int num_blocks, int block_size) override { kv_->allocate(num_blocks, block_size); }
  uint64_t kv_block_bytes(int block_size) const override { return kv_->block_bytes(block_size); }
  void forward(const StepInput& step, float* logits) override;

 private:
  struct Activations;
  Activations activations(int n_tokens, int n_logits);

  std::unique_ptr<ckpt::Checkpoint> checkpoint_;  // the mapped weights the backend may point into
  ckpt::LlamaConfig c_;
  Backend& be_;
  ShardSpec shard_;
  Communicator* comm_ = nullptr;
  int heads_ = 0, kv_heads_ = 0;  // this rank's query and KV heads
  LlamaWeights w_;
  std::unique_ptr<LmHead> head_;  // [vocab, hidden]: lm_head, or the embedding when tied
  ModelInfo info_;
  std::unique_ptr<PagedKvCache> kv_;  // this rank's KV heads
  DeviceBuffer arena_;                // the activations of a step, grown to the largest seen
  DeviceBuffer zeros_;                // FfnWorkspace::zeros
  StepIndex index_;
};

}  // namespace fineserve
