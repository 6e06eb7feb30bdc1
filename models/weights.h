// Loading weights from a (dense or FineQuant) checkpoint onto a backend, with every tensor's
// shape checked against what the config implies.
#pragma once

#include <string>
#include <vector>

#include "kernels/backend.h"
#include "models/checkpoint/safetensors.h"

namespace fineserve {

// A dense parameter vector/matrix on the device (norms, biases, embeddings).
struct DeviceTensor {
  const void* data = nullptr;
  DType dtype = DType::F16;
  std::vector<int64_t> shape;
};

class WeightLoader {
 public:
  WeightLoader(const ckpt::Checkpoint& checkpoint, Backend& backend, std::string prefix = "");

  // The FineQuant bits of this checkpoint (0 for a dense one).
  int bits() const { return bits_; }
  bool has(const std::string& name) const;
  // `stem`.weight (dense) or `stem`.qweight + `stem`.scales (FineQuant), checked to be [rows, cols].
  WeightMatrix linear(const std::string& stem, int64_t rows, int64_t cols);
  // A dense tensor of the given shape (float dtype), uploaded as stored.
  DeviceTensor dense(const std::string& name, const std::vector<int64_t>& shape);
  // Bytes of all weights loaded so far that a full forward reads.
  uint64_t bytes_loaded() const { return bytes_; }

 private:
  const ckpt::TensorView& expect(const std::string& name, const std::vector<int64_t>& shape,
                                 const std::vector<DType>& dtypes);
  const ckpt::Checkpoint& ckpt_;
  Backend& backend_;
  std::string prefix_;
  int bits_ = 0;
  uint64_t bytes_ = 0;
  ckpt::TensorView last_;
};

}  // namespace fineserve
