#include "models/weights.h"

#include "kernels/base.h"
#include "quant/quantizer.h"

namespace fineserve {
namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

WeightLoader::WeightLoader(const ckpt::Checkpoint& checkpoint, Backend& backend, std::string prefix)
    : ckpt_(checkpoint), backend_(backend), prefix_(std::move(prefix)) {
  const auto& meta = ckpt_.metadata();
  if (auto it = meta.find("format"); it != meta.end() && it->second == "fineserve-finequant") {
    auto b = meta.find("bits");
    if (b == meta.end() || (b->second != "8" && b->second != "4"))
      throw Error("checkpoint " + ckpt_.dir().string() + ": FineQuant metadata has no valid 'bits'");
    bits_ = std::stoi(b->second);
  }
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

WeightMatrix WeightLoader::linear(const std::string& stem, int64_t rows, int64_t cols) {
  WeightMatrix host;
  host.rows = rows;
  host.cols = cols;
  if (has(stem + ".qweight")) {
    if (bits_ == 0) throw Error("checkpoint " + ckpt_.dir().string() + ": " + stem + ".qweight without FineQuant metadata");
    const ckpt::TensorView scales_probe = ckpt_.get(prefix_ + stem + ".scales");
    if (scales_probe.shape().size() != 2 || scales_probe.shape()[1] <= 0 || cols % scales_probe.shape()[1] != 0)
      throw Error("checkpoint " + ckpt_.dir().string() + ": " + stem + ".scales has a shape that does not divide K");
    const int64_t group = cols / scales_probe.shape()[1];
    if (!quant::is_allowed_group(cols, group))
      throw Error("checkpoint " + ckpt_.dir().string() + ": " + stem + " has group " + std::to_string(group) +
                  ", not an allowed group size for K = " + std::to_string(cols));
    host.bits = bits_;
    host.group = group;
    host.dtype = bits_ == 4 ? DType::U8 : DType::I8;
    host.data = expect(stem + ".qweight", {rows, bits_ == 4 ? cols / 2 : cols}, {host.dtype}).data;
    host.scales = reinterpret_cast<const uint16_t*>(expect(stem + ".scales", {rows, cols / group}, {DType::F16}).data);
  } else {
    const ckpt::TensorView& w = expect(stem + ".weight", {rows, cols}, {DType::F32, DType::F16, DType::BF16});
    host.dtype = w.dtype();
    host.data = w.data;
  }
  bytes_ += static_cast<uint64_t>(host.bytes());
  return backend_.upload_weight(host);
}

DeviceTensor WeightLoader::dense(const std::string& name, const std::vector<int64_t>& shape) {
  const ckpt::TensorView& t = expect(name, shape, {DType::F32, DType::F16, DType::BF16});
  return {backend_.upload(t.data, t.nbytes()), t.dtype(), shape};
}

}  // namespace fineserve
