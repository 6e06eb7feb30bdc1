// The tensors of an OPT checkpoint as Hugging Face's OPTForCausalLM saves them, derived from its
// config: used to check a checkpoint against its config and to write synthetic checkpoints.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/checkpoint/config.h"

namespace fineserve {

struct TensorSpec {
  std::string name;  // e.g. "model.decoder.layers.0.fc1.weight"
  std::vector<int64_t> shape;
  enum class Init { Normal, Ones, Zeros } init = Init::Normal;
  bool linear = false;  // a [out, in] matrix of a linear layer (a quantization candidate)
};

// In the order HF writes them. lm_head is tied to embed_tokens and not listed.
std::vector<TensorSpec> opt_tensor_specs(const ckpt::OptConfig& c);

}  // namespace fineserve
