#include "models/lm_head.h"

#include <cstring>

#include "models/weights.h"

namespace fineserve {

LmHead::LmHead(const ckpt::Checkpoint& checkpoint, Backend& backend, const std::string& stem, int64_t vocab,
               int64_t cols, ShardSpec shard, Communicator* comm)
    : be_(backend), comm_(comm), world_(shard.world), vocab_(vocab), local_(vocab), out_(backend), gathered_(backend) {
  parallel_ = shard.world > 1 && vocab % shard.world == 0;
  FS_ASSERT(!parallel_ || (comm != nullptr && comm->world() == shard.world && comm->rank() == shard.rank));
  WeightLoader ld(checkpoint, backend, "", parallel_ ? shard : ShardSpec{});
  w_ = ld.linear(stem, vocab, cols, parallel_ ? Parallel::Column : Parallel::Replicated);
  if (parallel_) local_ = vocab / shard.world;
}

void LmHead::forward(const void* x, int64_t rows, float* logits) {
  const DType a = be_.act_dtype();
  void* out = out_.reserve(static_cast<size_t>(rows * local_) * dtype_size(a));
  be_.linear(w_, x, rows, out);
  if (!parallel_) {
    if (logits) be_.to_host_f32(out, rows * vocab_, logits);
    return;
  }
  void* all = gathered_.reserve(static_cast<size_t>(world_ * rows * local_) * dtype_size(a));
  comm_->all_gather(out, all, rows * local_, a);
  if (!logits) return;
  host_.resize(static_cast<size_t>(world_ * rows * local_));
  be_.to_host_f32(all, world_ * rows * local_, host_.data());
  // Rank r's part holds [rows, local] logits of vocabulary slice r.
  for (int r = 0; r < world_; ++r)
    for (int64_t i = 0; i < rows; ++i)
      std::memcpy(logits + i * vocab_ + r * local_, host_.data() + (r * rows + i) * local_,
                  static_cast<size_t>(local_) * sizeof(float));
}

}  // namespace fineserve
