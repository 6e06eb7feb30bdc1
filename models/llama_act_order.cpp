#include "models/llama_act_order.h"

#include <algorithm>

#include "kernels/base.h"

namespace fineserve {

InputGather::InputGather(Backend& backend, std::vector<int32_t> order)
    : be_(backend), order_(std::move(order)), ids_(backend) {
  FS_ASSERT(!order_.empty());
}

void InputGather::forward(const void* x, int64_t n_tokens, void* out) {
  const int64_t k = this->k();
  if (n_tokens > capacity_) {
    // Grown by doubling, so a run of growing prefills uploads O(log T) times.
    const int64_t capacity = std::max<int64_t>(n_tokens, 2 * capacity_);
    FS_ASSERT(capacity * k <= INT32_MAX, "activation gather too large for int32 ids");
    std::vector<int32_t> ids(static_cast<size_t>(capacity * k));
    for (int64_t t = 0; t < capacity; ++t)
      for (int64_t j = 0; j < k; ++j)
        ids[static_cast<size_t>(t * k + j)] = static_cast<int32_t>(t * k) + order_[static_cast<size_t>(j)];
    void* p = ids_.reserve(ids.size() * sizeof(int32_t));
    be_.copy_to_device(p, ids.data(), ids.size() * sizeof(int32_t));
    capacity_ = capacity;
  }
  // The backend's row gather with rows of one element: x viewed as a table of n_tokens * K rows.
  be_.embedding(x, be_.act_dtype(), 1, static_cast<const int32_t*>(ids_.get()), n_tokens * k, false, out);
}

}  // namespace fineserve
