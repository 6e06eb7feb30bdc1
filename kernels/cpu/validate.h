// Checks on op arguments shared by the reference and the fast CPU kernels.
#pragma once

#include <string_view>

#include "kernels/ops.h"

namespace fineserve::cpu {

// Throws fineserve::Error naming `what` when a weight matrix is malformed (a bad checkpoint):
// wrong bits, a group size FineQuant does not allow, odd cols for int4, missing scales.
void validate_weight(const WeightMatrix& w, std::string_view what);

// FS_ASSERTs the invariants the engine must keep when it fills PagedAttention: n_kv_heads divides
// n_heads, every sequence has 0 <= queries <= context, block size and table are set.
void validate_attention(const PagedAttention& p);

}  // namespace fineserve::cpu
