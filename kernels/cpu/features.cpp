#include "kernels/cpu/simd.h"

#include <cpuid.h>

namespace fineserve::cpu {

bool has_avx2() {
  // F16C is asked through CPUID.1:ECX bit 29: clang 14's __builtin_cpu_supports does not know "f16c".
  static const bool yes = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  }();
  return yes;
}

}  // namespace fineserve::cpu
