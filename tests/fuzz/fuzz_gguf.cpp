// libFuzzer target: arbitrary bytes as a GGUF file, through the same validation as
// gguf::File::open, then dequantization of every tensor a supported type holds. Bad input must end
// in fineserve::Error; anything else (a crash, a sanitizer report, another exception) is a bug.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kernels/base.h"
#include "models/checkpoint/gguf.h"

namespace gguf = fineserve::ckpt::gguf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  try {
    const gguf::Header h = gguf::parse(file, "fuzz.gguf");
    for (const auto& [key, value] : h.metadata) (void)value.to_string();
    std::vector<float> out;
    for (const gguf::TensorInfo& t : h.tensors) {
      FS_ASSERT(t.nbytes == 0 || h.data_start + t.offset + t.nbytes <= size, "a validated tensor leaves the file");
      if (t.nbytes == 0 || !gguf::can_dequantize(t.type) || t.numel > (1 << 20)) continue;
      out.resize(static_cast<size_t>(t.numel));
      gguf::dequantize(t.type, file.subspan(h.data_start + t.offset, t.nbytes), t.numel, out.data(), t.name);
    }
  } catch (const fineserve::Error&) {
  }
  return 0;
}
