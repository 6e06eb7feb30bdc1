#include "models/step_buffers.h"

#include <algorithm>
#include <string>

#include "kernels/base.h"

namespace fineserve {

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) be_->free(ptr_);
}

void* DeviceBuffer::reserve(size_t bytes) {
  bytes = std::max<size_t>(bytes, 1);
  if (bytes > bytes_) {
    if (ptr_) be_->free(ptr_);
    ptr_ = nullptr;  // a throwing alloc leaves an empty buffer, not a dangling one
    bytes_ = 0;
    ptr_ = be_->alloc(bytes);
    bytes_ = bytes;
  }
  return ptr_;
}

const void* DeviceBuffer::reserve_zeroed(size_t bytes) {
  const size_t before = bytes_;
  void* p = reserve(bytes);
  if (bytes_ != before) {
    const std::vector<std::byte> zeros(bytes_);
    be_->copy_to_device(p, zeros.data(), bytes_);
  }
  return p;
}

StepIndex::StepIndex(Backend& backend)
    : be_(backend), ids_(backend), pos_(backend), query_start_(backend), context_len_(backend), block_table_(backend) {}

void StepIndex::upload(const StepInput& s, int64_t max_positions, int64_t vocab_size, int32_t position_offset) {
  const int T = s.n_tokens(), S = s.n_seqs();
  FS_ASSERT(T > 0 && S > 0, "an empty step");
  FS_ASSERT(static_cast<int>(s.query_start.size()) == S + 1 && static_cast<int>(s.positions.size()) == T);
  for (int32_t p : s.positions)
    if (p < 0 || p >= max_positions)
      throw Error("position " + std::to_string(p) + " is past the model's context of " + std::to_string(max_positions));
  for (int32_t id : s.token_ids)
    if (id < 0 || id >= vocab_size)
      throw Error("token id " + std::to_string(id) + " is outside the vocabulary of " + std::to_string(vocab_size));

  auto put = [&](DeviceBuffer& buf, const std::vector<int32_t>& v) {
    void* p = buf.reserve(v.size() * 4);
    if (!v.empty()) be_.copy_to_device(p, v.data(), v.size() * 4);
  };
  put(ids_, s.token_ids);
  if (position_offset == 0) {
    put(pos_, s.positions);
  } else {
    shifted_.assign(s.positions.begin(), s.positions.end());
    for (int32_t& p : shifted_) p += position_offset;
    put(pos_, shifted_);
  }
  put(query_start_, s.query_start);
  put(context_len_, s.context_len);
  put(block_table_, s.block_table);
}

PagedAttention StepIndex::attention(const StepInput& s, int block_size) const {
  PagedAttention pa;
  pa.block_size = block_size;
  pa.n_seqs = s.n_seqs();
  pa.max_blocks = s.max_blocks;
  pa.query_start = static_cast<const int32_t*>(query_start_.get());
  pa.context_len = static_cast<const int32_t*>(context_len_.get());
  pa.block_table = static_cast<const int32_t*>(block_table_.get());
  return pa;
}

void gather_logit_rows(Backend& be, const StepInput& s, const void* hidden, int64_t dim, void* out) {
  const size_t row = static_cast<size_t>(dim) * dtype_size(be.act_dtype());
  for (size_t i = 0; i < s.logit_rows.size(); ++i) {
    const int32_t r = s.logit_rows[i];
    FS_ASSERT(r >= 0 && r < s.n_tokens(), "a logit row outside the step");
    be.copy(static_cast<char*>(out) + i * row, static_cast<const char*>(hidden) + static_cast<size_t>(r) * row, row);
  }
}

PagedKvCache::PagedKvCache(Backend& backend, int64_t n_layers, int64_t kv_dim)
    : be_(backend), n_layers_(n_layers), kv_dim_(kv_dim) {
  FS_ASSERT(n_layers_ > 0 && kv_dim_ > 0);
}

PagedKvCache::~PagedKvCache() { release(); }

void PagedKvCache::release() {
  for (void* p : k_) be_.free(p);
  for (void* p : v_) be_.free(p);
  k_.clear();
  v_.clear();
  block_size_ = 0;
}

uint64_t PagedKvCache::block_bytes(int block_size) const {
  return static_cast<uint64_t>(block_size) * kv_bytes_per_token(n_layers_, kv_dim_, dtype_size(be_.act_dtype()));
}

void PagedKvCache::allocate(int num_blocks, int block_size) {
  FS_ASSERT(num_blocks > 0 && block_size > 0);
  release();
  const size_t bytes = static_cast<size_t>(num_blocks) * static_cast<size_t>(block_size) *
                       static_cast<size_t>(kv_dim_) * dtype_size(be_.act_dtype());
  for (int64_t i = 0; i < n_layers_; ++i) {
    k_.push_back(be_.alloc(bytes));
    v_.push_back(be_.alloc(bytes));
  }
  block_size_ = block_size;
}

}  // namespace fineserve
