// The contract between the engine and a model: what one forward step reads, and the interface
// every architecture implements.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace fineserve {

// One step of a batch: the new tokens of every scheduled sequence packed back to back
// (a prefill chunk or one decode token each), where they sit, and where their KV cache lives.
struct StepInput {
  std::vector<int32_t> token_ids;    // [n_tokens]
  std::vector<int32_t> positions;    // [n_tokens] position of each token in its sequence
  std::vector<int32_t> query_start;  // [n_seqs + 1] offsets of each sequence's tokens
  std::vector<int32_t> context_len;  // [n_seqs] tokens in the cache after this step
  std::vector<int32_t> block_table;  // [n_seqs, max_blocks] physical KV blocks
  int max_blocks = 0;
  std::vector<int32_t> logit_rows;  // indices into token_ids whose next-token logits are wanted

  int n_tokens() const { return static_cast<int>(token_ids.size()); }
  int n_seqs() const { return static_cast<int>(context_len.size()); }
};

// What the engine needs to know about a loaded model.
struct ModelInfo {
  std::string architecture;   // "opt", "llama", ...
  std::string quantization;   // "none", "finequant-int8", "finequant-int4"
  std::string source_format;  // where the quantized weights came from: "none", "finequant", "gguf:Q4_1", ...
  int64_t vocab_size = 0;
  int64_t max_context = 0;    // positions the model can attend to
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;
  uint64_t weight_bytes = 0;  // bytes of weights one decode step reads (for bandwidth figures)
};

// Which part of the model a tensor-parallel rank holds: rank `rank` of `world` (Megatron style,
// DESIGN: Tensor parallelism). The default, world 1, is the whole model.
struct ShardSpec {
  int rank = 0;
  int world = 1;
};

// Bytes a paged KV cache holds per token: K and V, n_layers x kv_dim elements each (kv_dim = KV
// heads x head_dim), of dtype_bytes bytes. The one formula behind every KV sizing (the models'
// caches, the engine's budget arithmetic, the benchmarks' memory estimates).
inline uint64_t kv_bytes_per_token(int64_t n_layers, int64_t kv_dim, uint64_t dtype_bytes) {
  return 2ull * static_cast<uint64_t>(n_layers) * static_cast<uint64_t>(kv_dim) * dtype_bytes;
}

class Communicator;  // kernels/communicator.h

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelInfo& info() const = 0;
  // Allocates the paged KV cache on the backend: num_blocks blocks of block_size tokens per layer.
  virtual void allocate_kv_cache(int num_blocks, int block_size) = 0;
  // Bytes one KV block takes over all layers (K and V), to size the cache from a memory budget; a
  // tensor-parallel shard counts only the KV heads it holds.
  virtual uint64_t kv_block_bytes(int block_size) const = 0;
  // Runs one step; writes logits [step.logit_rows.size(), vocab_size] (fp32, host memory). Under
  // tensor parallelism every rank runs forward on the same step (the collectives pair up), and
  // `logits` may be null on ranks whose logits nobody reads (they skip the final norm and LM head).
  // A bad step (a position past the context, a token outside the vocabulary) throws
  // fineserve::Error before any collective, so every rank of a group rejects it alike.
  virtual void forward(const StepInput& step, float* logits) = 0;
};

// Loads the checkpoint at `path` onto `backend`, which must outlive the model: config.json's
// model_type picks the architecture in the registry (models/registry.h: opt, llama, mistral,
// mixtral); dense fp16/bf16/fp32 or FineQuant weights.
//
// With shard.world > 1 the model is rank shard.rank's shard of a tensor-parallel group, cut at load
// time (attention heads, FFN and expert columns; see the architectures' headers), and it runs its
// collectives on `comm` (rank and world matching `shard`; required then, and it must outlive the
// model).
//
// Throws fineserve::Error when the checkpoint is unusable (missing or mis-shaped tensors, ...) or
// cannot be split that way (heads, KV heads or FFN width not divisible by the world size, FineQuant
// groups that a row-parallel cut would split).
std::unique_ptr<Model> load_model(const std::filesystem::path& path, Backend& backend, ShardSpec shard = {},
                                  Communicator* comm = nullptr);

}  // namespace fineserve
