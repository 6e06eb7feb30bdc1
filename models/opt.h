// OPT (Zhang et al. 2022), as Hugging Face's OPTForCausalLM: learned positions with an offset of 2,
// pre- or post-LayerNorm, optional project_in/project_out (word_embed_proj_dim), ReLU MLP, and an
// LM head tied to the token embedding.
#pragma once

#include <memory>
#include <vector>

#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "models/weights.h"

namespace fineserve {

struct OptLayer {
  WeightMatrix q_proj, k_proj, v_proj;  // [hidden, hidden]
  DeviceTensor q_bias, k_bias, v_bias;  // [hidden]
  WeightMatrix out_proj;                // [hidden, hidden]
  DeviceTensor out_bias;                // [hidden]
  DeviceTensor attn_ln_w, attn_ln_b;    // [hidden] self_attn_layer_norm
  WeightMatrix fc1;                     // [ffn, hidden]
  DeviceTensor fc1_bias;                // [ffn]
  WeightMatrix fc2;                     // [hidden, ffn]
  DeviceTensor fc2_bias;                // [hidden]
  DeviceTensor ffn_ln_w, ffn_ln_b;      // [hidden] final_layer_norm (of the layer)
};

struct OptWeights {
  DeviceTensor embed_tokens;     // [vocab, word_embed_proj_dim]
  DeviceTensor embed_positions;  // [max_positions + 2, hidden]
  WeightMatrix project_in;       // [hidden, word_embed_proj_dim] (when the dims differ)
  WeightMatrix project_out;      // [word_embed_proj_dim, hidden]
  DeviceTensor final_ln_w, final_ln_b;  // [hidden] (pre-LN models)
  WeightMatrix lm_head;          // [vocab, word_embed_proj_dim], tied to embed_tokens unless stored
  std::vector<OptLayer> layers;
};

class OptModel : public Model {
 public:
  OptModel(std::unique_ptr<ckpt::Checkpoint> checkpoint, const ckpt::OptConfig& config, Backend& backend);
  ~OptModel() override;

  const ModelInfo& info() const override { return info_; }
  void allocate_kv_cache(int num_blocks, int block_size) override;
  uint64_t kv_block_bytes(int block_size) const override;
  void forward(const StepInput& step, float* logits) override;

 private:
  struct Buffers;
  void ensure_buffers(int n_tokens, int n_logits);
  void linear(const WeightMatrix& w, const void* x, int64_t m, const DeviceTensor& bias, void* y);

  std::unique_ptr<ckpt::Checkpoint> checkpoint_;  // the mapped weights the backend may point into
  ckpt::OptConfig c_;
  Backend& be_;
  OptWeights w_;
  ModelInfo info_;
  std::vector<void*> k_cache_, v_cache_;  // per layer [num_blocks, block_size, heads, head_dim]
  int block_size_ = 0;
  std::unique_ptr<Buffers> buf_;
};

}  // namespace fineserve
