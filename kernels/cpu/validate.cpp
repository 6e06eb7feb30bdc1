#include "kernels/cpu/validate.h"

#include <string>

#include "kernels/base.h"

namespace fineserve::cpu {

void validate_weight(const WeightMatrix& w, std::string_view what) {
  const std::string name(what);
  if (w.rows <= 0 || w.cols <= 0)
    throw Error(name + ": weight shape [" + std::to_string(w.rows) + ", " + std::to_string(w.cols) + "] is empty");
  if (w.data == nullptr) throw Error(name + ": weight has no data");
  if (!w.quantized()) {
    if (!is_float(w.dtype))
      throw Error(name + ": dense weight dtype " + std::string(dtype_name(w.dtype)) + " is not F32/F16/BF16");
    return;
  }
  if (w.bits != 4 && w.bits != 8)
    throw Error(name + ": FineQuant weights must have 4 or 8 bits, got " + std::to_string(w.bits));
  const bool pow2 = w.group >= 32 && (w.group & (w.group - 1)) == 0 && w.cols % w.group == 0;
  if (w.group != w.cols && !pow2)
    throw Error(name + ": group size " + std::to_string(w.group) + " is not allowed for " + std::to_string(w.cols) +
                " columns (K itself or a power of two >= 32 dividing K)");
  if (w.bits == 4 && w.cols % 2 != 0)
    throw Error(name + ": int4 weights need an even number of columns, got " + std::to_string(w.cols));
  if (w.scales == nullptr) throw Error(name + ": quantized weight has no scales");
}

void validate_attention(const PagedAttention& p) {
  FS_ASSERT(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "n_kv_heads must divide n_heads");
  FS_ASSERT(p.head_dim > 0 && p.block_size > 0 && p.n_seqs >= 0 && p.sliding_window >= 0);
  FS_ASSERT(p.n_seqs == 0 || (p.query_start && p.context_len && p.block_table && p.max_blocks > 0));
  for (int s = 0; s < p.n_seqs; ++s) {
    const int32_t nq = p.query_start[s + 1] - p.query_start[s];
    FS_ASSERT(nq >= 0 && nq <= p.context_len[s], "a sequence has more queries than context");
    FS_ASSERT((p.context_len[s] + p.block_size - 1) / p.block_size <= p.max_blocks,
              "context does not fit the block table");
  }
}

}  // namespace fineserve::cpu
