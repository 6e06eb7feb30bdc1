// Loading weights from a (dense or FineQuant) checkpoint onto a backend, with every tensor's
// shape checked against what the config implies, and — under tensor parallelism — cut to this
// rank's shard at load time (Megatron style, DESIGN: Tensor parallelism).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"  // ShardSpec

namespace fineserve {

// A dense parameter vector/matrix on the device (norms, biases, embeddings).
struct DeviceTensor {
  const void* data = nullptr;
  DType dtype = DType::F16;
  std::vector<int64_t> shape;
};

// How a linear layer [out, in] is divided among the ranks (Megatron's names).
enum class Parallel {
  Replicated,  // every rank holds the whole matrix
  Column,      // column-parallel: rank r holds output rows [r * out/world, (r+1) * out/world)
               // (whole heads for q/k/v, a slice of the FFN for fc1); its bias is split the same way
  Row,         // row-parallel: rank r holds input columns [r * in/world, (r+1) * in/world) and
               // computes a partial sum; the caller all-reduces the outputs and adds the bias once
};

class WeightLoader {
 public:
  WeightLoader(const ckpt::Checkpoint& checkpoint, Backend& backend, std::string prefix = "", ShardSpec shard = {});

  // The FineQuant bits of this checkpoint (0 for a dense one): every quantized matrix's, unless the
  // metadata's "matrix_bits" ({stem: bits}, written by `quantize --expert-bits`) says otherwise.
  int bits() const { return bits_; }
  // The bits of the quantized matrix `stem` (prefix applied): "matrix_bits" or bits().
  int bits_of(const std::string& stem) const;
  const ShardSpec& shard() const { return shard_; }
  bool has(const std::string& name) const;
  // `stem`.weight (dense) or `stem`.qweight + `stem`.scales (FineQuant), checked to be the full
  // [rows, cols], and returned as this rank's part of it under `parallel`.
  //
  // Row-parallel FineQuant matrices are cut along K, so the cut must fall between scale groups:
  // a group smaller than K must divide K / world (else fineserve::Error naming the matrix, its
  // group and the world size). A column-wise matrix (group = K, one scale per output row) splits
  // exactly: each rank keeps every row's scale and its slice becomes column-wise (group = K/world).
  WeightMatrix linear(const std::string& stem, int64_t rows, int64_t cols, Parallel parallel = Parallel::Replicated);
  // Column-parallel with an explicit cut: the output rows split into part.world equal parts, of
  // which this rank holds part part.rank. For projections whose parts are not one per rank: the
  // K/V projections of a model with fewer KV heads than ranks, where several ranks hold the same
  // KV head (the one their query heads read).
  WeightMatrix linear_part(const std::string& stem, int64_t rows, int64_t cols, ShardSpec part);
  // A token embedding [rows, cols] for lookups (replicated): `stem`.weight uploaded as stored, or a
  // FineQuant `stem`.qweight + .scales (`quantize --quantize-embeddings`) dequantized to fp16 on
  // the host at load time. A lookup reads a few rows per step, so only the LM head, which reads
  // every row, gains from keeping the codes: load it with linear(stem, ...).
  DeviceTensor embedding(const std::string& stem, int64_t rows, int64_t cols);
  // A dense tensor of the given shape (float dtype), uploaded as stored.
  DeviceTensor dense(const std::string& name, const std::vector<int64_t>& shape);
  // This rank's slice of a dense tensor along its first dimension (the bias of a column-parallel
  // layer): shape[0] / world rows.
  DeviceTensor dense_split(const std::string& name, const std::vector<int64_t>& shape);
  // Part part.rank of part.world of a dense tensor along its first dimension (linear_part's bias).
  DeviceTensor dense_part(const std::string& name, const std::vector<int64_t>& shape, ShardSpec part);
  // Bytes of all weights loaded so far that a full forward reads (this rank's shards).
  uint64_t bytes_loaded() const { return bytes_; }

 private:
  const ckpt::TensorView& expect(const std::string& name, const std::vector<int64_t>& shape,
                                 const std::vector<DType>& dtypes);
  // `stem` as stored, the full [rows, cols] matrix in checkpoint memory, checked; `row_bytes` gets
  // the stored bytes per row (of codes or values).
  WeightMatrix stored(const std::string& stem, int64_t rows, int64_t cols, int64_t* row_bytes);
  WeightMatrix load_linear(const std::string& stem, int64_t rows, int64_t cols, Parallel parallel, ShardSpec part);
  int64_t split(const std::string& what, int64_t n, const char* dim, int parts) const;
  const ckpt::Checkpoint& ckpt_;
  Backend& backend_;
  std::string prefix_;
  ShardSpec shard_;
  int bits_ = 0;
  std::map<std::string, int> matrix_bits_;  // full stem -> bits, where the metadata lists them
  uint64_t bytes_ = 0;
  ckpt::TensorView last_;
};

}  // namespace fineserve
