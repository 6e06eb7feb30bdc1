// Environment overrides of the CPU backend's options (the one place that reads them; README,
// "CPU kernel paths and the int8 options"):
//   FINESERVE_CPU_ISA=reference|avx2|avx512   force a kernel path (default: the best the CPU runs)
//   FINESERVE_CPU_INT8_ACT=1                  int8 activations in the quantized linear layers
//   FINESERVE_CPU_INT8_HEAD=1                 dense linear weights (the LM head) as int8
//   OMP_NUM_THREADS                           threads (read by OpenMP itself)
// A value it does not understand is an Error naming the variable.
#pragma once

#include "kernels/cpu/cpu_backend.h"

namespace fineserve {

CpuOptions cpu_options_from_env();

}  // namespace fineserve
