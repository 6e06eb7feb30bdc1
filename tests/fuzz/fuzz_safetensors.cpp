// libFuzzer target: arbitrary bytes as a safetensors file, through the same validation as
// SafetensorsFile::open. Bad input must end in fineserve::Error; anything else (a crash, a
// sanitizer report, another exception) is a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "kernels/base.h"
#include "models/checkpoint/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  try {
    const fineserve::ckpt::ParsedFile parsed = fineserve::ckpt::parse_file_bytes(file, "fuzz.safetensors");
    // Touch every byte each tensor claims, so AddressSanitizer sees any span the checks let past.
    uint8_t acc = 0;
    for (const fineserve::ckpt::TensorInfo& t : parsed.header.tensors) {
      FS_ASSERT(t.begin <= t.end && parsed.data_start + t.end <= size, "a validated span leaves the file");
      FS_ASSERT(static_cast<uint64_t>(t.numel()) * fineserve::dtype_size(t.dtype) == t.nbytes());
      for (uint64_t i = parsed.data_start + t.begin; i < parsed.data_start + t.end; ++i) acc ^= data[i];
    }
    volatile uint8_t sink = acc;  // keeps the reads from being optimised away
    (void)sink;
  } catch (const fineserve::Error&) {
  }
  return 0;
}
