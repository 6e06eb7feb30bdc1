// Loading weights from a (dense or FineQuant) checkpoint onto a backend, with every tensor's
// shape checked against what the config implies, and — under tensor parallelism — cut to this
// rank's shard at load time (Megatron style, DESIGN: Tensor parallelism).
#pragma once

#include <deque>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "models/checkpoint/hf_quant.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"  // ShardSpec
#include "quant/format.h"

namespace fineserve {

// A dense parameter vector/matrix on the device (norms, biases, embeddings); empty (data null)
// when the model has none. Passes to the backend as the DenseParam it is (a bias, a norm's gamma).
struct DeviceTensor {
  const void* data = nullptr;
  DType dtype = DType::F16;
  std::vector<int64_t> shape;

  operator DenseParam() const { return {data, dtype}; }  // NOLINT(google-explicit-constructor)
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
  int bits() const { return format_ ? format_->bits : 0; }
  // "none", or the FineQuant format's name for the checkpoint's quantization ("finequant-int4",
  // "finequant-int8,experts-int4"): what ModelInfo::quantization reports.
  std::string quantization_name() const {
    if (hf_quant_) return hf_quant_->method_name() + "-int" + std::to_string(hf_quant_->bits);
    return format_ ? format_->quantization_name() : "none";
  }
  // Where the quantized matrices came from ("finequant", "gguf:Q4_1", "gguf:Q4_1,gguf:Q8_0", ...;
  // quant/format.h; "gptq", "awq", "compressed-tensors" for a Hugging Face quantized checkpoint);
  // "none" for a dense checkpoint: what ModelInfo::source_format reports.
  std::string source_format() const {
    if (hf_quant_) return hf_quant_->method_name();
    return format_ ? format_->source_format_summary() : "none";
  }
  const ShardSpec& shard() const { return shard_; }
  bool has(const std::string& name) const;
  // `stem`.weight (dense) or `stem`.qweight + `stem`.scales (+ `stem`.offsets when asymmetric)
  // (FineQuant), checked to be the full
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
  // Two linear weights of the same input stacked into one [2 * rows, cols] matrix (`stem_a`'s rows,
  // then `stem_b`'s), so that one GEMM computes both: SwiGLU's [gate | up]. Both are
  // column-parallel: under tensor parallelism the result is [2 * rows / world, cols], this rank's
  // rows of `stem_a` then its rows of `stem_b` (so act(gate) * up pairs the same columns on every
  // rank). Each half is checked as linear() checks a matrix. Two quantized halves with the same
  // bits but different group sizes are both stored at the finer group: a coarse scale repeated
  // over its sub-groups dequantizes identically. A quantized half next to a dense one (a --keep
  // pattern matching only one) or next to one of other bits is dequantized: the pair runs in fp32.
  WeightMatrix stacked_linear(const std::string& stem_a, const std::string& stem_b, int64_t rows, int64_t cols);
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
  // Activation order (models/llama_act_order.h): whether the caller multiplies matrices whose K the
  // loader permuted by their input gathered in input_order(stem). Off (the default), such a matrix
  // is refused with a clear error instead of being served wrong.
  void accept_input_order(bool accept) { accept_input_order_ = accept; }
  // The input channel each column of the loaded matrix `stem` reads (stacked_linear: `stem_a`);
  // empty when K was not permuted.
  std::vector<int32_t> input_order(const std::string& stem) const;
  // Bytes of all weights loaded so far that a full forward reads (this rank's shards).
  uint64_t bytes_loaded() const { return bytes_; }

 private:
  const ckpt::TensorView& expect(const std::string& name, const std::vector<int64_t>& shape,
                                 const std::vector<DType>& dtypes);
  // `stem` as stored, the full [rows, cols] matrix in checkpoint memory, checked; `row_bytes` gets
  // the stored bytes per row (of codes or values).
  WeightMatrix stored(const std::string& stem, int64_t rows, int64_t cols, int64_t* row_bytes);
  // stored() for a matrix of a GPTQ / AWQ / compressed-tensors checkpoint: re-laid into relaid_.
  WeightMatrix stored_hf(const std::string& stem, int64_t rows, int64_t cols, int64_t* row_bytes);
  WeightMatrix load_linear(const std::string& stem, int64_t rows, int64_t cols, Parallel parallel, ShardSpec part);
  int64_t split(const std::string& what, int64_t n, const char* dim, int parts) const;
  const ckpt::Checkpoint& ckpt_;
  Backend& backend_;
  std::string prefix_;
  ShardSpec shard_;
  std::optional<quant::FormatMetadata> format_;  // FineQuant checkpoints only
  std::optional<ckpt::HfQuantConfig> hf_quant_;  // GPTQ / AWQ / compressed-tensors checkpoints only
  // The matrices stored_hf re-laid, alive until the backend has copied them (cleared per load).
  std::deque<ckpt::RelaidMatrix> relaid_;
  bool accept_input_order_ = false;
  std::map<std::string, std::vector<int32_t>> input_orders_;  // stem -> order, permuted matrices only
  uint64_t bytes_ = 0;
  ckpt::TensorView last_;
  // Aligned fp32 copies of the offsets stored() read, alive until the backend has copied them.
  std::vector<std::vector<float>> offsets_;
};

}  // namespace fineserve
