// Parameter structs shared by every backend's ops (CPU reference, CPU fast path, CUDA).
// Shapes are in comments next to the pointers; all matrices are row-major.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace fineserve {

// A linear layer's weight as the checkpoint stores it (HF layout, [out = rows, in = cols]).
// Dense: dtype F32/F16/BF16 and data = [rows, cols].
// Quantized (FineQuant): bits 8 -> data = int8 codes [rows, cols];
//                        bits 4 -> data = packed codes [rows, cols / 2], two per byte, element 2j in
//                        the low nibble and 2j+1 in the high nibble, each stored as code + 8 (0..15);
//                        scales = fp16 [rows, cols / group]; w[r][c] = code[r][c] * scales[r][c / group];
//                        asymmetric (offsets not null): offsets = fp32 [rows, cols / group] and
//                        w[r][c] = code[r][c] * scales[r][c / group] + offsets[r][c / group].
struct WeightMatrix {
  int64_t rows = 0;  // N: output features
  int64_t cols = 0;  // K: input features (the reduction dimension; groups run along it)
  DType dtype = DType::F16;  // element type of dense weights; I8 / U8 for int8 / packed int4 codes
  int bits = 0;              // 0 = dense, 8 or 4 = FineQuant codes
  int64_t group = 0;         // quantized only: a power of two >= 32 dividing cols, or cols itself
  const void* data = nullptr;
  const uint16_t* scales = nullptr;  // fp16 bit patterns, [rows, cols / group]
  const float* offsets = nullptr;    // quantized only, optional: fp32 [rows, cols / group]; null = symmetric

  bool asymmetric() const { return offsets != nullptr; }

  bool quantized() const { return bits != 0; }
  int64_t groups_per_row() const { return quantized() ? cols / group : 0; }
  // Bytes of weight data (codes + scales, or dense values) a full pass over the matrix reads.
  int64_t bytes() const {
    if (!quantized()) return rows * cols * static_cast<int64_t>(dtype_size(dtype));
    return rows * cols * bits / 8 + rows * groups_per_row() * (asymmetric() ? 6 : 2);
  }
};

// A dense parameter vector in device memory that an op may add or multiply by: a linear layer's
// bias, a norm's gamma or beta. `data` null means "none" (no bias; gamma 1, beta 0).
struct DenseParam {
  const void* data = nullptr;  // [n] of dtype
  DType dtype = DType::F16;

  bool present() const { return data != nullptr; }
};

enum class Activation { ReLU, GELU, GELUTanh, SiLU };

// Attention over a paged KV cache for a batch of sequences whose new tokens are packed
// back to back (prefill chunks and single decode tokens mixed). For sequence s the step's
// queries are tokens [query_start[s], query_start[s+1]) and sit at the last positions of its
// context: query i of n_q sits at position context_len[s] - n_q + i and attends causally to
// cache positions [0, that position] (or the last `sliding_window` of them when it is > 0).
// Cache layout per layer: [num_blocks, block_size, n_kv_heads, head_dim]; the cache position p of
// sequence s lives in block block_table[s * max_blocks + p / block_size], slot p % block_size.
struct PagedAttention {
  int n_heads = 0;
  int n_kv_heads = 0;  // divides n_heads (grouped-query attention when smaller)
  int head_dim = 0;
  float scale = 1.0f;  // usually 1/sqrt(head_dim)
  int sliding_window = 0;
  int block_size = 16;
  int n_seqs = 0;
  int max_blocks = 0;                   // row stride of block_table
  const int32_t* query_start = nullptr;  // [n_seqs + 1]
  const int32_t* context_len = nullptr;  // [n_seqs], including this step's tokens
  const int32_t* block_table = nullptr;  // [n_seqs, max_blocks]
};

}  // namespace fineserve
