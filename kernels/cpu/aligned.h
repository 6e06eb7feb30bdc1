// 64-byte aligned host memory (one cache line, one AVX-512 vector) for the CPU backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

namespace fineserve::cpu {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<uint8_t[], FreeDeleter>;

inline constexpr size_t kAlign = 64;

// Raw aligned allocation (size rounded up to the alignment); nullptr for 0 bytes; throws
// std::bad_alloc when the memory is not there.
inline void* aligned_malloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  void* p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
  if (!p) throw std::bad_alloc();
  return p;
}

// Zero-filled aligned bytes.
inline AlignedBytes aligned_zeros(size_t bytes) {
  AlignedBytes b(static_cast<uint8_t*>(aligned_malloc(bytes)));
  if (bytes) std::memset(b.get(), 0, bytes);
  return b;
}

}  // namespace fineserve::cpu
