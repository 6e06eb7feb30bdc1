// The device memory every architecture's forward keeps from step to step: grow-only activation
// buffers, the step's index arrays, and the paged KV cache of its layers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "models/model.h"

namespace fineserve {

// One device allocation that grows to the largest size asked for (it never shrinks) and is freed
// with its owner.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(Backend& backend) : be_(&backend) {}
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // At least `bytes` bytes (at least 1); the contents are undefined after it grows.
  void* reserve(size_t bytes);
  // As reserve, but every byte is zero (the buffer must then only be read).
  const void* reserve_zeroed(size_t bytes);
  void* get() const { return ptr_; }

 private:
  Backend* be_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Cuts a buffer into 64-byte-aligned pieces; with a null base it only adds up the sizes, so that
// one layout function serves both to size a buffer and to place pointers in it.
struct ScratchCarver {
  char* base = nullptr;
  size_t used = 0;
  void* take(size_t bytes) {
    void* p = base ? base + used : nullptr;
    used += (bytes + 63) / 64 * 64;
    return p;
  }
};

// Runs `layout` (a function of a ScratchCarver& returning a struct of pointers) once to size the
// pieces, grows `arena` to fit, and runs it again to place them there.
template <class Layout>
auto carve_in(DeviceBuffer& arena, Layout&& layout) {
  ScratchCarver size;
  layout(size);
  ScratchCarver place{static_cast<char*>(arena.reserve(size.used))};
  return layout(place);
}

// A step's index arrays (StepInput's) on the device.
class StepIndex {
 public:
  explicit StepIndex(Backend& backend);

  // Checks the step against the model (throws fineserve::Error for a position outside
  // [0, max_positions) or a token id outside [0, vocab_size), before any device work or collective,
  // so that every rank of a tensor-parallel group rejects a bad step alike), then uploads its arrays.
  // Positions are uploaded shifted by `position_offset` (OPT's learned positions start at 2).
  void upload(const StepInput& step, int64_t max_positions, int64_t vocab_size, int32_t position_offset = 0);

  const int32_t* token_ids() const { return static_cast<const int32_t*>(ids_.get()); }   // [T]
  const int32_t* positions() const { return static_cast<const int32_t*>(pos_.get()); }   // [T]
  // The attention of this step: the sequence fields point at the uploaded arrays; the head
  // fields (n_heads, n_kv_heads, head_dim, scale, sliding_window) are the caller's to set.
  PagedAttention attention(const StepInput& step, int block_size) const;

 private:
  Backend& be_;
  DeviceBuffer ids_, pos_, query_start_, context_len_, block_table_;
  std::vector<int32_t> shifted_;  // host positions + offset
};

// out[i, :] = hidden[step.logit_rows[i], :] for every logit row: the rows whose next-token logits
// are wanted (hidden [T, dim], out [L, dim], activations).
void gather_logit_rows(Backend& backend, const StepInput& step, const void* hidden, int64_t dim, void* out);

// The paged KV cache of a model's layers: per layer, K and V of layout
// [num_blocks, block_size, kv_heads, head_dim] in the backend's activation dtype. A tensor-parallel
// shard holds its own KV heads only (`kv_dim` = its kv_heads * head_dim).
class PagedKvCache {
 public:
  PagedKvCache(Backend& backend, int64_t n_layers, int64_t kv_dim);
  ~PagedKvCache();
  PagedKvCache(const PagedKvCache&) = delete;
  PagedKvCache& operator=(const PagedKvCache&) = delete;

  // Bytes of one block over all layers, K and V.
  uint64_t block_bytes(int block_size) const;
  // (Re)allocates num_blocks blocks of block_size tokens per layer (the old contents are dropped).
  void allocate(int num_blocks, int block_size);
  int block_size() const { return block_size_; }  // 0 before allocate
  void* k(size_t layer) const { return k_[layer]; }
  void* v(size_t layer) const { return v_[layer]; }

 private:
  void release();
  Backend& be_;
  int64_t n_layers_, kv_dim_;
  std::vector<void*> k_, v_;
  int block_size_ = 0;
};

}  // namespace fineserve
