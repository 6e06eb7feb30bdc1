#include "configs/cpu_env.h"

#include <cstdlib>
#include <string>

#include "kernels/base.h"

namespace fineserve {
namespace {

bool read_flag(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return false;
  const std::string s = v;
  if (s == "1" || s == "true" || s == "on") return true;
  if (s == "0" || s == "false" || s == "off") return false;
  throw Error(std::string(name) + "=" + s + ": expected 1 or 0");
}

}  // namespace

CpuOptions cpu_options_from_env() {
  CpuOptions o;
  if (const char* isa = std::getenv("FINESERVE_CPU_ISA"); isa && *isa) {
    o.isa = cpu::parse_isa(isa);
    if (!o.isa) throw Error(std::string("FINESERVE_CPU_ISA=") + isa + ": expected reference, avx2 or avx512");
  }
  o.int8_activations = read_flag("FINESERVE_CPU_INT8_ACT");
  o.int8_dense_weights = read_flag("FINESERVE_CPU_INT8_HEAD");
  return o;
}

}  // namespace fineserve
