// The architecture registry: config.json's model_type -> everything FineServe knows about an
// architecture, in one table (registry.cpp). Loading a model, writing a synthetic checkpoint and
// sizing a KV cache all look the architecture up here instead of switching on model_type.
//
// Adding an architecture means: its config parser (models/checkpoint/config.h), its files (the
// model with its `Architecture` entry, its tensor layout), one line in registry.cpp's table, and
// its golden test.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "models/opt_layout.h"  // TensorSpec

namespace fineserve {

class Communicator;

// The sizes that memory planning needs, from a parsed and checked config (nothing loaded).
struct ArchitectureShape {
  int64_t hidden_size = 0;
  int64_t n_layers = 0;
  int64_t n_kv_heads = 0;  // the model's KV heads (all attention heads without grouped-query attention)
  int64_t head_dim = 0;
  // Elements of an LM head tied to the token embedding (0 when untied): a backend may hold a
  // second, GEMM-ready copy of it.
  int64_t tied_head_elements = 0;

  // Bytes the whole model's paged KV cache holds per token (models/model.h kv_bytes_per_token).
  uint64_t kv_bytes_per_token(uint64_t dtype_bytes) const;
};

// One architecture. `source` names the config in error messages.
struct Architecture {
  // Parses and checks the config (fineserve::Error when the architecture rejects it).
  ArchitectureShape (*shape)(const nlohmann::json& config, const std::string& source);
  // The tensors of its Hugging Face checkpoint, in the order HF writes them (synthetic checkpoints).
  std::vector<TensorSpec> (*tensor_specs)(const nlohmann::json& config, const std::string& source);
  // Loads the model (see load_model in models/model.h for shard and comm).
  std::unique_ptr<Model> (*load)(std::unique_ptr<ckpt::Checkpoint> checkpoint, const nlohmann::json& config,
                                 const std::string& source, Backend& backend, ShardSpec shard, Communicator* comm);
};

// The entries, each defined next to its model.
extern const Architecture kOptArchitecture;    // models/opt.cpp
extern const Architecture kLlamaArchitecture;  // models/llama.cpp: Llama, Mistral, Mixtral, Qwen2

// The architecture of config.json's model_type; fineserve::Error naming `source`, the type and the
// supported types when there is none.
const Architecture& find_architecture(const nlohmann::json& config, const std::string& source);
// The registered model types, comma-separated ("opt, llama, mistral, mixtral, qwen2").
std::string supported_model_types();

}  // namespace fineserve
