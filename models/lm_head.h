// The LM head: logits = x · Wᵀ over the vocabulary, replicated on every rank or — under tensor
// parallelism, when the vocabulary divides evenly — vocab-parallel (Megatron): rank r holds rows
// [r·V/world, (r+1)·V/world) of W, computes those logits, and one all-gather assembles the full
// rows. Vocab-parallel saves each rank (world−1)/world of the head's memory and of the bytes a
// decode step reads: OPT-175B's fp16 head is 1.2 GB, about 11 % of an int4 rank's step at TP = 8.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/communicator.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "models/step_buffers.h"

namespace fineserve {

class LmHead {
 public:
  // Loads `stem` ("lm_head", or a tied embedding such as "model.embed_tokens": `stem`.weight dense,
  // or FineQuant `stem`.qweight + .scales) as a [vocab, cols] matrix. Vocab-parallel when
  // shard.world > 1 and vocab % shard.world == 0 (then `comm` is required); replicated otherwise.
  LmHead(const ckpt::Checkpoint& checkpoint, Backend& backend, const std::string& stem, int64_t vocab, int64_t cols,
         ShardSpec shard, Communicator* comm);

  // Every rank of the group calls it on the same step when vocab_parallel() (the all-gather pairs
  // up); `logits` ([rows, vocab] fp32, host) may then be null on ranks whose logits nobody reads.
  // x: [rows, cols] activations on the backend.
  void forward(const void* x, int64_t rows, float* logits);

  bool vocab_parallel() const { return parallel_; }
  // Bytes of this rank's part of the matrix (what one forward reads).
  uint64_t bytes() const { return static_cast<uint64_t>(w_.bytes()); }

 private:
  Backend& be_;
  Communicator* comm_;
  int world_ = 1;
  bool parallel_ = false;
  int64_t vocab_ = 0, local_ = 0;  // the vocabulary and this rank's rows of it
  WeightMatrix w_;
  DeviceBuffer out_, gathered_;
  std::vector<float> host_;  // the gathered [world, rows, local] logits, reordered into [rows, vocab]
};

}  // namespace fineserve
