// Which instruction-set path the fast CPU kernels take, chosen at run time from what the CPU runs.
//
// The default build targets plain x86-64; each fast kernel is compiled for its ISA through a target
// attribute (FS_AVX2 in simd.h, FS_AVX512 here) and is reached only when the CPU has that ISA. Every
// path can be forced (CpuOptions::isa, or FINESERVE_CPU_ISA through configs/cpu_env.h) so that tests
// run each one against the reference on any machine that has it.
#pragma once

#include <optional>
#include <string_view>

// AVX-512 with the byte/word (BW), vector-length (VL) and VNNI extensions: vpdpbusd multiplies
// unsigned by signed bytes and adds groups of four into int32 lanes in one instruction.
#define FS_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

namespace fineserve::cpu {

enum class Isa {
  Reference,   // cpu::ref: scalar, single-threaded, sums in double
  Avx2,        // AVX2 + FMA + F16C
  Avx512Vnni,  // AVX-512 F/BW/VL/DQ + VNNI (the int8-activation kernels use 512-bit vpdpbusd)
};

// True when this CPU runs `isa` (the reference runs everywhere).
bool isa_supported(Isa isa);
// The best path this CPU runs.
Isa best_isa();
// "reference", "avx2", "avx512-vnni".
std::string_view isa_name(Isa isa);
// The inverse of isa_name; also accepts "avx512". Empty for an unknown name.
std::optional<Isa> parse_isa(std::string_view name);

}  // namespace fineserve::cpu
