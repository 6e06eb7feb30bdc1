// OPT (Zhang et al. 2022), as Hugging Face's OPTForCausalLM: learned positions with an offset of 2,
// pre- or post-LayerNorm, optional project_in/project_out (word_embed_proj_dim), ReLU MLP, and an
// LM head tied to the token embedding.
//
// Tensor parallelism (Megatron, DESIGN): given a ShardSpec and a communicator, the model holds
// only its rank's heads and FFN columns: q/k/v and fc1 are column-parallel (whole heads / a slice
// of ffn_dim per rank, biases split with them), out_proj and fc2 are row-parallel (a slice of K)
// and each is followed by one all-reduce of the [T, hidden] partial sums; their biases live on
// rank 0 only, so the sum adds them once. Embeddings, positions, layer norms and project_in/out
// are replicated (a small part of the weights of the models FineServe targets). The LM head is
// vocab-parallel when the vocabulary divides by the world size, replicated otherwise
// (models/lm_head.h). The KV cache of a rank holds its heads only.
#pragma once

#include <memory>
#include <vector>

#include "kernels/communicator.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/lm_head.h"
#include "models/model.h"
#include "models/step_buffers.h"
#include "models/weights.h"

namespace fineserve {

// Shapes per rank: h = hidden / world (this rank's heads), f = ffn / world; world = 1 without TP.
struct OptLayer {
  WeightMatrix q_proj, k_proj, v_proj;  // [h, hidden] column-parallel
  DeviceTensor q_bias, k_bias, v_bias;  // [h]
  WeightMatrix out_proj;                // [hidden, h] row-parallel
  DeviceTensor out_bias;                // [hidden] (rank 0 only)
  DeviceTensor attn_ln_w, attn_ln_b;    // [hidden] self_attn_layer_norm
  WeightMatrix fc1;                     // [f, hidden] column-parallel
  DeviceTensor fc1_bias;                // [f]
  WeightMatrix fc2;                     // [hidden, f] row-parallel
  DeviceTensor fc2_bias;                // [hidden] (rank 0 only)
  DeviceTensor ffn_ln_w, ffn_ln_b;      // [hidden] final_layer_norm (of the layer)
};

struct OptWeights {
  DeviceTensor embed_tokens;     // [vocab, word_embed_proj_dim]
  DeviceTensor embed_positions;  // [max_positions + 2, hidden]
  WeightMatrix project_in;       // [hidden, word_embed_proj_dim] (when the dims differ)
  WeightMatrix project_out;      // [word_embed_proj_dim, hidden]
  DeviceTensor final_ln_w, final_ln_b;  // [hidden] (pre-LN models)
  std::vector<OptLayer> layers;
};

class OptModel : public Model {
 public:
  // `comm` (world = shard.world, rank = shard.rank) must outlive the model; it may be null when
  // shard.world == 1. Throws fineserve::Error when the heads or the FFN (or a FineQuant matrix's
  // groups) cannot be split across shard.world ranks.
  OptModel(std::unique_ptr<ckpt::Checkpoint> checkpoint, const ckpt::OptConfig& config, Backend& backend,
           ShardSpec shard = {}, Communicator* comm = nullptr);
  ~OptModel() override;

  const ModelInfo& info() const override { return info_; }
  void allocate_kv_cache(int num_blocks, int block_size) override { kv_->allocate(num_blocks, block_size); }
  uint64_t kv_block_bytes(int block_size) const override { return kv_->block_bytes(block_size); }
  void forward(const StepInput& step, float* logits) override;

 private:
  struct Activations;
  Activations activations(int n_tokens, int n_logits);

  std::unique_ptr<ckpt::Checkpoint> checkpoint_;  // the mapped weights the backend may point into
  ckpt::OptConfig c_;
  Backend& be_;
  ShardSpec shard_;
  Communicator* comm_ = nullptr;
  int64_t heads_ = 0, hidden_ = 0, ffn_ = 0;  // this rank's attention heads, heads * head_dim, FFN width
  OptWeights w_;
  std::unique_ptr<LmHead> head_;  // [vocab, word_embed_proj_dim], tied to embed_tokens unless stored
  ModelInfo info_;
  std::unique_ptr<PagedKvCache> kv_;  // this rank's heads
  DeviceBuffer arena_;                // the activations of a step, grown to the largest seen
  StepIndex index_;
};

}  // namespace fineserve
