#include "models/weights.h"

#include <algorithm>
#include <cstring>

#include "kernels/base.h"
#include "kernels/cpu/convert.h"
#include "kernels/half.h"
#include "quant/quantizer.h"

namespace fineserve {
namespace {

// Copies rows [r0, r0 + nr) x bytes [c0, c0 + nc) of a row-major [*, row_bytes] byte matrix
// into a contiguous buffer (a rank's shard of a checkpoint tensor, which the backend then uploads).
std::vector<std::byte> copy_block(const void* src, int64_t row_bytes, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  std::vector<std::byte> out(static_cast<size_t>(nr * nc));
  const auto* s = static_cast<const std::byte*>(src);
  for (int64_t r = 0; r < nr; ++r)
    std::memcpy(out.data() + r * nc, s + (r0 + r) * row_bytes + c0, static_cast<size_t>(nc));
  return out;
}

// out[r][c] += offsets[r][c / group]: the asymmetric part of a dequantized [rows, cols] block.
void add_offsets(const float* offsets, int64_t rows, int64_t cols, int64_t group, float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] += offsets[r * (cols / group) + c / group];
}

}  // namespace

WeightLoader::WeightLoader(const ckpt::Checkpoint& checkpoint, Backend& backend, std::string prefix, ShardSpec shard)
    : ckpt_(checkpoint), backend_(backend), prefix_(std::move(prefix)), shard_(shard) {
  FS_ASSERT(shard_.world >= 1 && shard_.rank >= 0 && shard_.rank < shard_.world);
  format_ = quant::read_header_metadata(ckpt_.metadata(), "checkpoint " + ckpt_.dir().string());
  if (!format_) hf_quant_ = ckpt::read_hf_quant_config(ckpt_);
}

bool WeightLoader::has(const std::string& name) const { return ckpt_.has(prefix_ + name); }

const ckpt::TensorView& WeightLoader::expect(const std::string& name, const std::vector<int64_t>& shape,
                                             const std::vector<DType>& dtypes) {
  last_ = ckpt_.get(prefix_ + name);
  if (last_.shape() != shape)
    throw Error("checkpoint " + ckpt_.dir().string() + ": tensor " + prefix_ + name + " has shape " +
                ckpt::format_shape(last_.shape()) + " but config.json implies " + ckpt::format_shape(shape));
  bool ok = false;
  for (DType d : dtypes) ok |= d == last_.dtype();
  if (!ok)
    throw Error("checkpoint " + ckpt_.dir().string() + ": tensor " + prefix_ + name + " has unsupported dtype " +
                std::string(dtype_name(last_.dtype())));
  return last_;
}

// n / parts, or an error naming what cannot be split.
int64_t WeightLoader::split(const std::string& what, int64_t n, const char* dim, int parts) const {
  if (n % parts != 0)
    throw Error("tensor parallelism: cannot split " + prefix_ + what + " across " + std::to_string(parts) +
                " ranks: its " + dim + " " + std::to_string(n) + " is not divisible by " + std::to_string(parts));
  return n / parts;
}

WeightMatrix WeightLoader::linear(const std::string& stem, int64_t rows, int64_t cols, Parallel parallel) {
  return load_linear(stem, rows, cols, parallel, shard_);
}

WeightMatrix WeightLoader::linear_part(const std::string& stem, int64_t rows, int64_t cols, ShardSpec part) {
  FS_ASSERT(part.world >= 1 && part.rank >= 0 && part.rank < part.world);
  return load_linear(stem, rows, cols, Parallel::Column, part);
}

WeightMatrix WeightLoader::stored(const std::string& stem, int64_t rows, int64_t cols, int64_t* row_bytes_out) {
  WeightMatrix host;
  host.rows = rows;
  host.cols = cols;
  int64_t row_bytes = 0;  // of the stored codes / values
  if (hf_quant_ && ckpt::has_hf_quantized(ckpt_, *hf_quant_, prefix_ + stem))
    return stored_hf(stem, rows, cols, row_bytes_out);
  if (has(quant::codes_name(stem))) {
    if (!format_)
      throw Error("checkpoint " + ckpt_.dir().string() + ": " + quant::codes_name(stem) + " without FineQuant metadata");
    // The group is what the scales' shape says (the metadata's "groups" is for people and tools).
    const ckpt::TensorView scales_probe = ckpt_.get(prefix_ + quant::scales_name(stem));
    if (scales_probe.shape().size() != 2 || scales_probe.shape()[1] <= 0 || cols % scales_probe.shape()[1] != 0)
      throw Error("checkpoint " + ckpt_.dir().string() + ": " + quant::scales_name(stem) +
                  " has a shape that does not divide K");
    const quant::MatrixFormat f{format_->bits_of(prefix_ + stem), cols / scales_probe.shape()[1]};
    if (!quant::is_allowed_group(cols, f.group))
      throw Error("checkpoint " + ckpt_.dir().string() + ": " + stem + " has group " + std::to_string(f.group) +
                  ", not an allowed group size for K = " + std::to_string(cols));
    host.bits = f.bits;
    host.group = f.group;
    host.dtype = f.code_dtype();
    row_bytes = f.code_row_bytes(cols);
    host.data = expect(quant::codes_name(stem), {rows, row_bytes}, {host.dtype}).data;
    host.scales = reinterpret_cast<const uint16_t*>(
        expect(quant::scales_name(stem), {rows, f.groups_per_row(cols)}, {DType::F16}).data);
    if (has(quant::offsets_name(stem))) {
      // Copied out of the mapping: checkpoint memory need not be 4-byte aligned for fp32 reads.
      const ckpt::TensorView& o =
          expect(quant::offsets_name(stem), {rows, f.groups_per_row(cols)}, {quant::kOffsetDType});
      offsets_.emplace_back(static_cast<size_t>(rows * f.groups_per_row(cols)));
      std::memcpy(offsets_.back().data(), o.data, offsets_.back().size() * sizeof(float));
      host.offsets = offsets_.back().data();
    }
  } else {
    const ckpt::TensorView& w = expect(stem + ".weight", {rows, cols}, {DType::F32, DType::F16, DType::BF16});
    host.dtype = w.dtype();
    host.data = w.data;
    row_bytes = cols * static_cast<int64_t>(dtype_size(w.dtype()));
  }

  *row_bytes_out = row_bytes;
  return host;
}

std::vector<int32_t> WeightLoader::input_order(const std::string& stem) const {
  const auto it = input_orders_.find(stem);
  return it == input_orders_.end() ? std::vector<int32_t>{} : it->second;
}

WeightMatrix WeightLoader::stored_hf(const std::string& stem, int64_t rows, int64_t cols, int64_t* row_bytes) {
  const ckpt::HfQuantConfig& q = *hf_quant_;
  const int64_t group = q.group_size == -1 ? cols : q.group_size;
  if (!quant::is_allowed_group(cols, group))
    throw Error("checkpoint " + ckpt_.dir().string() + ": " + prefix_ + stem + " is " + q.describe() +
                ": quantization_config group_size " + std::to_string(q.group_size) +
                " is not a group FineServe's kernels run for K = " + std::to_string(cols) +
                " (K itself, -1, or a power of two >= 32 dividing K)");
  ckpt::RelaidMatrix& m = relaid_.emplace_back(ckpt::relay_hf_matrix(ckpt_, q, prefix_ + stem, rows, cols));
  if (!m.k_order.empty()) {
    if (!accept_input_order_)
      throw Error("checkpoint " + ckpt_.dir().string() + ": " + prefix_ + stem + " is " + q.describe() +
                  " with a g_idx that reorders its input channels, which this layer does not support");
    input_orders_[stem] = m.k_order;
  }
  WeightMatrix host;
  host.rows = rows;
  host.cols = cols;
  host.bits = m.bits;
  host.group = m.group;
  const quant::MatrixFormat f{m.bits, m.group};
  host.dtype = f.code_dtype();
  host.data = m.codes.data();
  host.scales = m.scales.data();
  if (!m.offsets.empty()) host.offsets = m.offsets.data();  // zero points (w = scale · code + offset)
  *row_bytes = f.code_row_bytes(cols);
  return host;
}

// `part` is the cut: rank part.rank of part.world (the loader's shard, except for linear_part).
WeightMatrix WeightLoader::load_linear(const std::string& stem, int64_t rows, int64_t cols, Parallel parallel,
                                       ShardSpec part) {
  if (part.world == 1) parallel = Parallel::Replicated;
  relaid_.clear();
  int64_t row_bytes = 0;
  WeightMatrix host = stored(stem, rows, cols, &row_bytes);
  const void* scales = host.scales;
  const void* offsets = host.offsets;
  if (parallel == Parallel::Row && input_orders_.count(stem))
    throw Error("tensor parallelism: cannot split " + prefix_ + stem + " along K across " +
                std::to_string(part.world) + " ranks: its input channels are in activation order (g_idx), so a "
                "rank's slice would read channels another rank holds");

  // This rank's shard, copied out of the mapped checkpoint into contiguous buffers. Offsets are cut
  // exactly as scales are (one per (row, group)), 4 bytes each.
  std::vector<std::byte> data, scale_data, offset_data;
  const int64_t r = part.rank;
  if (parallel == Parallel::Column) {
    const int64_t n = split(stem, rows, "output dimension", part.world);
    data = copy_block(host.data, row_bytes, r * n, n, 0, row_bytes);
    if (host.quantized()) {
      const int64_t sb = host.groups_per_row() * 2;
      scale_data = copy_block(scales, sb, r * n, n, 0, sb);
      if (offsets) offset_data = copy_block(offsets, 2 * sb, r * n, n, 0, 2 * sb);
    }
    host.rows = n;
  } else if (parallel == Parallel::Row) {
    const int64_t k = split(stem, cols, "input dimension (K)", part.world);
    if (!host.quantized()) {
      const int64_t eb = static_cast<int64_t>(dtype_size(host.dtype));
      data = copy_block(host.data, row_bytes, 0, rows, r * k * eb, k * eb);
    } else {
      if (host.group != cols && k % host.group != 0)
        throw Error("tensor parallelism: cannot split the FineQuant matrix " + prefix_ + stem + " across " +
                    std::to_string(part.world) + " ranks: its group size " + std::to_string(host.group) +
                    " does not divide the per-rank K = " + std::to_string(cols) + " / " + std::to_string(part.world) +
                    " = " + std::to_string(k) + " (requantize it with a group that divides " + std::to_string(k) +
                    ", or use a tensor-parallel size that keeps whole groups on each rank)");
      if (host.bits == 4 && k % 2 != 0)
        throw Error("tensor parallelism: cannot split the int4 matrix " + prefix_ + stem + " across " +
                    std::to_string(part.world) + " ranks: the per-rank K = " + std::to_string(k) +
                    " is odd and int4 codes are packed two per byte");
      const int64_t kb = quant::MatrixFormat{host.bits, host.group}.code_row_bytes(k);
      data = copy_block(host.data, row_bytes, 0, rows, r * kb, kb);
      const int64_t sb = host.groups_per_row() * 2;
      if (host.group == cols) {
        // Column-wise: one scale per output row covers all of K, so every slice of K keeps it.
        scale_data = copy_block(scales, sb, 0, rows, 0, sb);
        if (offsets) offset_data = copy_block(offsets, 2 * sb, 0, rows, 0, 2 * sb);
        host.group = k;
      } else {
        const int64_t per_rank = sb / part.world;
        scale_data = copy_block(scales, sb, 0, rows, r * per_rank, per_rank);
        if (offsets) offset_data = copy_block(offsets, 2 * sb, 0, rows, 2 * r * per_rank, 2 * per_rank);
      }
    }
    host.cols = k;
  }
  if (!data.empty()) host.data = data.data();
  if (!scale_data.empty()) host.scales = reinterpret_cast<const uint16_t*>(scale_data.data());
  if (!offset_data.empty()) host.offsets = reinterpret_cast<const float*>(offset_data.data());
  bytes_ += static_cast<uint64_t>(host.bytes());
  const WeightMatrix uploaded = backend_.upload_weight(host);
  offsets_.clear();  // the backend holds its own copy now
  return uploaded;
}

WeightMatrix WeightLoader::stacked_linear(const std::string& stem_a, const std::string& stem_b, int64_t rows,
                                          int64_t cols) {
  relaid_.clear();
  const std::string stems[2] = {stem_a, stem_b};
  WeightMatrix half[2];
  int64_t row_bytes[2] = {0, 0};
  for (int i = 0; i < 2; ++i) half[i] = stored(stems[i], rows, cols, &row_bytes[i]);
  if (input_order(stem_a) != input_order(stem_b))
    throw Error("checkpoint " + ckpt_.dir().string() + ": " + prefix_ + stem_a + " and " + prefix_ + stem_b +
                " read their shared input in different activation orders (g_idx), so they cannot run as one GEMM");

  // This rank's rows of each half (column-parallel): [r0, r0 + n).
  if (rows % shard_.world != 0)
    throw Error("tensor parallelism: cannot split " + prefix_ + stem_a + " and " + prefix_ + stem_b + " across " +
                std::to_string(shard_.world) + " ranks: their output dimension " + std::to_string(rows) +
                " is not divisible by " + std::to_string(shard_.world));
  const int64_t n = rows / shard_.world, r0 = shard_.rank * n;
  for (int i = 0; i < 2; ++i) {
    half[i].data = static_cast<const std::byte*>(half[i].data) + r0 * row_bytes[i];
    if (half[i].quantized()) half[i].scales += r0 * half[i].groups_per_row();
    if (half[i].offsets) half[i].offsets += r0 * half[i].groups_per_row();
    half[i].rows = n;
  }
  auto append_rows = [&](std::vector<std::byte>& out, int i) {
    const auto* p = static_cast<const std::byte*>(half[i].data);
    out.insert(out.end(), p, p + n * row_bytes[i]);
  };

  WeightMatrix fused;
  fused.rows = 2 * n;
  fused.cols = cols;
  std::vector<std::byte> data;
  std::vector<uint16_t> scales;
  std::vector<float> offsets;  // when either half is asymmetric (a symmetric half's offsets are 0)
  if (half[0].quantized() && half[1].quantized() && half[0].bits == half[1].bits) {
    fused.bits = half[0].bits;
    fused.dtype = half[0].dtype;
    fused.group = std::min(half[0].group, half[1].group);
    const int64_t groups = fused.groups_per_row();
    for (int i = 0; i < 2; ++i) {
      append_rows(data, i);
      const int64_t repeat = half[i].group / fused.group, stored_groups = half[i].groups_per_row();
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < groups; ++g) {
          uint16_t scale;  // memcpy: checkpoint memory need not be 2-byte aligned
          std::memcpy(&scale, reinterpret_cast<const std::byte*>(half[i].scales) + 2 * (r * stored_groups + g / repeat), 2);
          scales.push_back(scale);
          if (half[0].offsets || half[1].offsets)
            offsets.push_back(half[i].offsets ? half[i].offsets[r * stored_groups + g / repeat] : 0.0f);
        }
    }
    fused.scales = scales.data();
    if (!offsets.empty()) fused.offsets = offsets.data();
  } else if (!half[0].quantized() && !half[1].quantized() && half[0].dtype == half[1].dtype) {
    fused.dtype = half[0].dtype;
    for (int i = 0; i < 2; ++i) append_rows(data, i);
  } else {
    std::vector<float> rows_f32(static_cast<size_t>(2 * n * cols));
    for (int i = 0; i < 2; ++i) {
      float* out = rows_f32.data() + i * n * cols;
      if (half[i].quantized()) {
        std::vector<uint16_t> half_scales(static_cast<size_t>(n * half[i].groups_per_row()));
        std::memcpy(half_scales.data(), half[i].scales, half_scales.size() * 2);
        quant::dequantize_rows(static_cast<const uint8_t*>(half[i].data), half_scales.data(), n, cols, half[i].bits,
                               half[i].group, out);
        if (half[i].offsets) add_offsets(half[i].offsets, n, cols, half[i].group, out);
      } else {
        cpu::to_f32(half[i].data, half[i].dtype, n * cols, out);
      }
    }
    fused.dtype = DType::F32;
    data.resize(rows_f32.size() * 4);
    std::memcpy(data.data(), rows_f32.data(), data.size());
  }
  fused.data = data.data();
  bytes_ += static_cast<uint64_t>(fused.bytes());
  const WeightMatrix uploaded = backend_.upload_weight(fused);  // copies: `data` and `scales` may go
  offsets_.clear();
  return uploaded;
}

DeviceTensor WeightLoader::embedding(const std::string& stem, int64_t rows, int64_t cols) {
  if (!has(quant::codes_name(stem))) return dense(stem + ".weight", {rows, cols});
  int64_t row_bytes = 0;
  const WeightMatrix q = stored(stem, rows, cols, &row_bytes);
  std::vector<uint16_t> table(static_cast<size_t>(rows * cols));
  std::vector<float> row(static_cast<size_t>(cols));  // one row at a time: no fp32 copy of the table
  for (int64_t r = 0; r < rows; ++r) {
    quant::dequantize_rows(static_cast<const uint8_t*>(q.data) + r * row_bytes, q.scales + r * q.groups_per_row(), 1,
                           cols, q.bits, q.group, row.data());
    if (q.offsets) add_offsets(q.offsets + r * q.groups_per_row(), 1, cols, q.group, row.data());
    for (int64_t c = 0; c < cols; ++c) table[static_cast<size_t>(r * cols + c)] = float_to_half(row[static_cast<size_t>(c)]);
  }
  offsets_.clear();
  return {backend_.upload(table.data(), table.size() * sizeof(uint16_t)), DType::F16, {rows, cols}};
}

DeviceTensor WeightLoader::dense(const std::string& name, const std::vector<int64_t>& shape) {
  const ckpt::TensorView& t = expect(name, shape, {DType::F32, DType::F16, DType::BF16});
  return {backend_.upload(t.data, t.nbytes()), t.dtype(), shape};
}

DeviceTensor WeightLoader::dense_split(const std::string& name, const std::vector<int64_t>& shape) {
  return dense_part(name, shape, shard_);
}

DeviceTensor WeightLoader::dense_part(const std::string& name, const std::vector<int64_t>& shape, ShardSpec part) {
  FS_ASSERT(!shape.empty() && part.world >= 1 && part.rank >= 0 && part.rank < part.world);
  if (part.world == 1) return dense(name, shape);
  const ckpt::TensorView& t = expect(name, shape, {DType::F32, DType::F16, DType::BF16});
  std::vector<int64_t> local = shape;
  local[0] = split(name, shape[0], "first dimension", part.world);
  const size_t bytes = t.nbytes() / static_cast<size_t>(part.world);
  return {backend_.upload(t.data + bytes * static_cast<size_t>(part.rank), bytes), t.dtype(), local};
}

}  // namespace fineserve
