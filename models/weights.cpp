#include "models/weights.h"

#include <cstring>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "kernels/half.h"
#include "quant/quantizer.h"

namespace fineserve {
namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Copies rows [r0, r0 + nr) x bytes [c0, c0 + nc) of a row-major [*, row_bytes] byte matrix
// into a contiguous buffer (a rank's shard of a checkpoint tensor, which the backend then uploads).
std::vector<std::byte> copy_block(const void* src, int64_t row_bytes, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  std::vector<std::byte> out(static_cast<size_t>(nr * nc));
  const auto* s = static_cast<const std::byte*>(src);
  for (int64_t r = 0; r < nr; ++r)
    std::memcpy(out.data() + r * nc, s + (r0 + r) * row_bytes + c0, static_cast<size_t>(nc));
  return out;
}

}  // namespace

WeightLoader::WeightLoader(const ckpt::Checkpoint& checkpoint, Backend& backend, std::string prefix, ShardSpec shard)
    : ckpt_(checkpoint), backend_(backend), prefix_(std::move(prefix)), shard_(shard) {
  FS_ASSERT(shard_.world >= 1 && shard_.rank >= 0 && shard_.rank < shard_.world);
  const auto& meta = ckpt_.metadata();
  if (auto it = meta.find("format"); it != meta.end() && it->second == "fineserve-finequant") {
    auto b = meta.find("bits");
    if (b == meta.end() || (b->second != "8" && b->second != "4"))
      throw Error("checkpoint " + ckpt_.dir().string() + ": FineQuant metadata has no valid 'bits'");
    bits_ = std::stoi(b->second);
    if (auto mb = meta.find("matrix_bits"); mb != meta.end()) {  // quantize --expert-bits
      const nlohmann::json j = nlohmann::json::parse(mb->second, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object()) throw Error("checkpoint " + ckpt_.dir().string() + ": metadata 'matrix_bits' is not a JSON object");
      for (const auto& [stem, v] : j.items()) {
        if (!v.is_number_integer() || (v.get<int>() != 8 && v.get<int>() != 4))
          throw Error("checkpoint " + ckpt_.dir().string() + ": metadata 'matrix_bits' gives " + stem + " " + v.dump() +
                      " bits (8 or 4 expected)");
        matrix_bits_[stem] = v.get<int>();
      }
    }
  }
}

int WeightLoader::bits_of(const std::string& stem) const {
  const auto it = matrix_bits_.find(prefix_ + stem);
  return it == matrix_bits_.end() ? bits_ : it->second;
}

bool WeightLoader::has(const std::string& name) const { return ckpt_.has(prefix_ + name); }

const ckpt::TensorView& WeightLoader::expect(const std::string& name, const std::vector<int64_t>& shape,
                                             const std::vector<DType>& dtypes) {
  last_ = ckpt_.get(prefix_ + name);
  if (last_.shape() != shape)
    throw Error("checkpoint " + ckpt_.dir().string() + ": tensor " + prefix_ + name + " has shape " +
                shape_str(last_.shape()) + " but config.json implies " + shape_str(shape));
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
  if (has(stem + ".qweight")) {
    if (bits_ == 0) throw Error("checkpoint " + ckpt_.dir().string() + ": " + stem + ".qweight without FineQuant metadata");
    const ckpt::TensorView scales_probe = ckpt_.get(prefix_ + stem + ".scales");
    if (scales_probe.shape().size() != 2 || scales_probe.shape()[1] <= 0 || cols % scales_probe.shape()[1] != 0)
      throw Error("checkpoint " + ckpt_.dir().string() + ": " + stem + ".scales has a shape that does not divide K");
    const int64_t group = cols / scales_probe.shape()[1];
    if (!quant::is_allowed_group(cols, group))
      throw Error("checkpoint " + ckpt_.dir().string() + ": " + stem + " has group " + std::to_string(group) +
                  ", not an allowed group size for K = " + std::to_string(cols));
    const int bits = bits_of(stem);
    host.bits = bits;
    host.group = group;
    host.dtype = bits == 4 ? DType::U8 : DType::I8;
    row_bytes = bits == 4 ? cols / 2 : cols;
    host.data = expect(stem + ".qweight", {rows, row_bytes}, {host.dtype}).data;
    host.scales = reinterpret_cast<const uint16_t*>(expect(stem + ".scales", {rows, cols / group}, {DType::F16}).data);
  } else {
    const ckpt::TensorView& w = expect(stem + ".weight", {rows, cols}, {DType::F32, DType::F16, DType::BF16});
    host.dtype = w.dtype();
    host.data = w.data;
    row_bytes = cols * static_cast<int64_t>(dtype_size(w.dtype()));
  }

  *row_bytes_out = row_bytes;
  return host;
}

// `part` is the cut: rank part.rank of part.world (the loader's shard, except for linear_part).
WeightMatrix WeightLoader::load_linear(const std::string& stem, int64_t rows, int64_t cols, Parallel parallel,
                                       ShardSpec part) {
  if (part.world == 1) parallel = Parallel::Replicated;
  int64_t row_bytes = 0;
  WeightMatrix host = stored(stem, rows, cols, &row_bytes);
  const void* scales = host.scales;

  // This rank's shard, copied out of the mapped checkpoint into contiguous buffers.
  std::vector<std::byte> data, scale_data;
  const int64_t r = part.rank;
  if (parallel == Parallel::Column) {
    const int64_t n = split(stem, rows, "output dimension", part.world);
    data = copy_block(host.data, row_bytes, r * n, n, 0, row_bytes);
    if (host.quantized()) {
      const int64_t sb = host.groups_per_row() * 2;
      scale_data = copy_block(scales, sb, r * n, n, 0, sb);
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
      const int64_t kb = host.bits == 4 ? k / 2 : k;
      data = copy_block(host.data, row_bytes, 0, rows, r * kb, kb);
      const int64_t sb = host.groups_per_row() * 2;
      if (host.group == cols) {
        // Column-wise: one scale per output row covers all of K, so every slice of K keeps it.
        scale_data = copy_block(scales, sb, 0, rows, 0, sb);
        host.group = k;
      } else {
        const int64_t per_rank = sb / part.world;
        scale_data = copy_block(scales, sb, 0, rows, r * per_rank, per_rank);
      }
    }
    host.cols = k;
  }
  if (!data.empty()) host.data = data.data();
  if (!scale_data.empty()) host.scales = reinterpret_cast<const uint16_t*>(scale_data.data());
  bytes_ += static_cast<uint64_t>(host.bytes());
  return backend_.upload_weight(host);
}

DeviceTensor WeightLoader::embedding(const std::string& stem, int64_t rows, int64_t cols) {
  if (!has(stem + ".qweight")) return dense(stem + ".weight", {rows, cols});
  int64_t row_bytes = 0;
  const WeightMatrix q = stored(stem, rows, cols, &row_bytes);
  std::vector<uint16_t> table(static_cast<size_t>(rows * cols));
  std::vector<float> row(static_cast<size_t>(cols));  // one row at a time: no fp32 copy of the table
  for (int64_t r = 0; r < rows; ++r) {
    quant::dequantize_rows(static_cast<const uint8_t*>(q.data) + r * row_bytes, q.scales + r * q.groups_per_row(), 1,
                           cols, q.bits, q.group, row.data());
    for (int64_t c = 0; c < cols; ++c) table[static_cast<size_t>(r * cols + c)] = float_to_half(row[static_cast<size_t>(c)]);
  }
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
