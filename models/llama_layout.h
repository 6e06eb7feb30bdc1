// The tensors of a Llama / Mistral / Mixtral checkpoint as Hugging Face's LlamaForCausalLM,
// MistralForCausalLM and MixtralForCausalLM save them (Mixtral in the hub's original layout,
// block_sparse_moe.experts.E.{w1,w2,w3}, which transformers 5 also writes back on save), derived
// from the config: used to check a checkpoint against its config and to write synthetic or
// imported checkpoints.
#pragma once

#include <vector>

#include "models/checkpoint/config.h"
#include "models/opt_layout.h"  // TensorSpec

namespace fineserve {

// In the order HF writes them; lm_head.weight is listed only when the embeddings are untied.
std::vector<TensorSpec> llama_tensor_specs(const ckpt::LlamaConfig& c);

}  // namespace fineserve
