#include <cpuid.h>

#include "kernels/cpu/dispatch.h"
#include "kernels/cpu/simd.h"

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

namespace {

bool has_avx512_vnni() {
  // __builtin_cpu_supports also checks that the OS saves the 512-bit state (XCR0).
  static const bool yes = has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vnni");
  return yes;
}

}  // namespace

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Reference: return true;
    case Isa::Avx2: return has_avx2();
    case Isa::Avx512Vnni: return has_avx512_vnni();
  }
  return false;
}

Isa best_isa() {
  if (isa_supported(Isa::Avx512Vnni)) return Isa::Avx512Vnni;
  if (isa_supported(Isa::Avx2)) return Isa::Avx2;
  return Isa::Reference;
}

std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::Reference: return "reference";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512Vnni: return "avx512-vnni";
  }
  return "?";
}

std::optional<Isa> parse_isa(std::string_view name) {
  if (name == "reference" || name == "ref") return Isa::Reference;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512-vnni" || name == "avx512") return Isa::Avx512Vnni;
  return std::nullopt;
}

}  // namespace fineserve::cpu
