// `fineserve bench gemm`: the CUDA quantized linear layer (kernels/cuda/gemm.h, Auto path) on the
// OPT-175B, OPT-30B and OPT-13B layer shapes for M = 1 ... 2048 tokens, int4 (group 128 and
// column-wise) and int8 (column-wise), against cuBLAS fp16 on the same shape and against the bytes
// floor: (weight bytes + x bytes + y bytes) / the device-to-device copy bandwidth (bytes read +
// written per second) measured in the same run.
//
// Timing: CUDA events around batches of calls after a warm-up, median over many batches; every
// weight (ours and cuBLAS's) is uploaded in enough copies, rotated call by call, that the set
// exceeds --rotate-mb (default 256 MB, > the 50 MB L2) and each call streams from HBM. Weights and
// activations are random and never zero. The targets are printed next to each row as
// information; the exit code does not depend on them.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/report.h"
#include "kernels/base.h"

#ifdef FINESERVE_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kernels/cuda/dequant.h"
#include "kernels/cuda/gemm.h"
#include "kernels/half.h"
#endif

namespace fineserve::bench {
namespace {

struct Flags {
  std::string out = "docs/results/gemm_gpu.json";
  std::vector<int64_t> ms = {1, 4, 16, 32, 64, 128, 512, 2048};
  std::vector<std::string> models = {"opt-175b", "opt-30b", "opt-13b"};
  std::vector<std::string> formats = {"int4-g128", "int4-col", "int8-col"};
  std::string act = "f16";
  double min_seconds = 0.1;
  double rotate_mb = 256;
};

#ifdef FINESERVE_HAVE_CUDA

struct Shape {
  const char* model;
  const char* layer;
  int64_t k, n;
};

const Shape kShapes[] = {
    {"opt-175b", "qkv", 12288, 36864},  {"opt-175b", "out_proj", 12288, 12288},
    {"opt-175b", "fc1", 12288, 49152},  {"opt-175b", "fc2", 49152, 12288},
    {"opt-30b", "qkv", 7168, 21504},    {"opt-30b", "out_proj", 7168, 7168},
    {"opt-30b", "fc1", 7168, 28672},    {"opt-30b", "fc2", 28672, 7168},
    {"opt-13b", "qkv", 5120, 15360},    {"opt-13b", "out_proj", 5120, 5120},
    {"opt-13b", "fc1", 5120, 20480},    {"opt-13b", "fc2", 20480, 5120},
};

struct Format {
  const char* name;
  int bits;
  int64_t group;  // 0 = column-wise (K)
};
const Format kFormats[] = {{"int4-g128", 4, 128}, {"int4-col", 4, 0}, {"int8-col", 8, 0}};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw Error(std::string("cuBLAS error in ") + what + ": " + cublasGetStatusString(s));
}

// splitmix64: fast enough to fill gigabytes of random weights on the host.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

// A random nonzero fp16 / bf16 value of magnitude in [0.25, 1.25) * scale, random sign.
uint16_t random_act_bits(Rng& rng, bool f16, float scale) {
  const uint64_t r = rng.next();
  const float v = (0.25f + static_cast<float>(r & 0xFFFF) / 65536.0f) * scale * ((r >> 16) & 1 ? -1.0f : 1.0f);
  return f16 ? float_to_half(v) : float_to_bf16(v);
}

struct HostQuant {
  WeightMatrix w;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scales;
};

HostQuant make_quant(const Shape& s, const Format& f, uint64_t seed) {
  Rng rng{seed};
  HostQuant h;
  h.w.rows = s.n;
  h.w.cols = s.k;
  h.w.bits = f.bits;
  h.w.group = f.group ? f.group : s.k;
  h.w.dtype = f.bits == 4 ? DType::U8 : DType::I8;
  h.codes.resize(static_cast<size_t>(s.n * s.k * f.bits / 8));
  for (size_t i = 0; i < h.codes.size(); i += 8) {
    uint64_t r = rng.next();
    for (size_t j = 0; j < 8 && i + j < h.codes.size(); ++j, r >>= 8) {
      // Uniform random bytes: every code a quantizer writes (int4 -8..7 as nibbles 0..15, int8
      // -128..127) appears, and all-zero tiles are vanishingly rare, so no kernel can shortcut.
      h.codes[i + j] = static_cast<uint8_t>(r);
    }
  }
  h.scales.resize(static_cast<size_t>(s.n * (s.k / h.w.group)));
  for (auto& v : h.scales) v = float_to_half(0.001f + static_cast<float>(rng.next() % 9000) * 1e-6f);
  h.w.data = h.codes.data();
  h.w.scales = h.scales.data();
  return h;
}

struct Timing {
  double us_median = 0, us_min = 0;
  int samples = 0;
};

// Median and best µs per call: each sample is one batch of `copies` calls (one pass over the rotated
// weights) between two CUDA events, after a warm-up of two passes.
template <typename Call>
Timing time_calls(cudaStream_t stream, size_t copies, double min_seconds, Call&& call) {
  for (size_t i = 0; i < 2 * copies + 1; ++i) call(i % copies);
  check(cudaStreamSynchronize(stream), "warm-up");
  cudaEvent_t a, b;
  check(cudaEventCreate(&a), "cudaEventCreate");
  check(cudaEventCreate(&b), "cudaEventCreate");
  std::vector<double> us;
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    check(cudaEventRecord(a, stream), "cudaEventRecord");
    for (size_t i = 0; i < copies; ++i) call(i);
    check(cudaEventRecord(b, stream), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    us.push_back(1000.0 * ms / static_cast<double>(copies));
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if ((us.size() >= 25 && elapsed >= min_seconds) || us.size() >= 5000) break;
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us.front(), static_cast<int>(us.size())};
}

// Device-to-device copy bandwidth, bytes read + written per second (GB/s = 1e9 B/s), median of many.
double measure_copy_bw_gbs(cudaStream_t stream) {
  constexpr size_t kBytes = size_t{1} << 30;
  void *src = nullptr, *dst = nullptr;
  check(cudaMalloc(&src, kBytes), "cudaMalloc (copy bandwidth)");
  check(cudaMalloc(&dst, kBytes), "cudaMalloc (copy bandwidth)");
  check(cudaMemset(src, 0x5a, kBytes), "cudaMemset");
  const Timing t = time_calls(stream, 1, 0.2, [&](size_t) {
    check(cudaMemcpyAsync(dst, src, kBytes, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
  });
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * static_cast<double>(kBytes) / (t.us_median * 1e3);
}

// The targets: minimum speed-up over cuBLAS fp16 (and share of copy bandwidth at M = 1, int4).
struct Target {
  double speedup = 0;  // 0: no target for this row
  double bw_pct = 0;
};
Target target_for(int bits, int64_t m) {
  if (bits == 4) {
    if (m == 1) return {3.5, 85};
    if (m == 16) return {3.0, 0};
    if (m == 64) return {2.0, 0};
    if (m == 128) return {1.3, 0};
  } else if (m == 1) {
    return {1.8, 0};
  }
  if (m >= 512) return {0.9, 0};
  return {};
}

const char* path_name(cuda::GemmPath p) {
  switch (p) {
    case cuda::GemmPath::Gemv: return "gemv";
    case cuda::GemmPath::TensorCore: return "tensor-core";
    case cuda::GemmPath::DequantCublas: return "dequant+cublas";
    case cuda::GemmPath::Auto: return "auto";
  }
  return "?";
}

size_t copies_for(int64_t bytes, double rotate_mb) {
  return static_cast<size_t>(std::max(2.0, rotate_mb * 1e6 / static_cast<double>(bytes) + 1));
}

void run(const Flags& f) {
  if (!cuda::device_available()) throw Error("`fineserve bench gemm` needs a CUDA GPU, and none is usable here");
  const bool f16 = f.act == "f16";
  if (!f16 && f.act != "bf16") throw Error("--act must be f16 or bf16, got " + f.act);
  const DType act = f16 ? DType::F16 : DType::BF16;
  const cudaDataType_t cuda_act = f16 ? CUDA_R_16F : CUDA_R_16BF;
  for (int64_t m : f.ms)
    if (m < 1 || m > 65536) throw Error("--m values must be in [1, 65536], got " + std::to_string(m));
  std::vector<const Format*> formats;
  for (const std::string& name : f.formats) {
    const Format* found = nullptr;
    for (const Format& fm : kFormats)
      if (name == fm.name) found = &fm;
    if (!found) throw Error("unknown --formats entry " + name + " (int4-g128, int4-col, int8-col)");
    formats.push_back(found);
  }

  cudaDeviceProp prop{};
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  cudaStream_t stream = nullptr;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  cublasHandle_t cublas = nullptr;
  check(cublasCreate(&cublas), "cublasCreate");
  check(cublasSetStream(cublas, stream), "cublasSetStream");

  std::printf("device %s (%d SMs, L2 %.0f MB), activations %s\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6, f.act.c_str());
  const double copy_bw = measure_copy_bw_gbs(stream);
  std::printf("device-to-device copy: %.0f GB/s (read + write)\n", copy_bw);

  // x and y big enough for the largest m and shape; random nonzero x.
  const int64_t max_m = *std::max_element(f.ms.begin(), f.ms.end());
  int64_t max_k = 0, max_n = 0;
  for (const Shape& s : kShapes) {
    max_k = std::max(max_k, s.k);
    max_n = std::max(max_n, s.n);
  }
  void *d_x = nullptr, *d_y = nullptr;
  {
    std::vector<uint16_t> x(static_cast<size_t>(max_m * max_k));
    Rng rng{7};
    for (auto& v : x) v = random_act_bits(rng, f16, 4.0f);
    check(cudaMalloc(&d_x, x.size() * 2), "cudaMalloc (x)");
    check(cudaMemcpy(d_x, x.data(), x.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy (x)");
    check(cudaMalloc(&d_y, static_cast<size_t>(max_m * max_n) * 2), "cudaMalloc (y)");
  }

  Table table({"model", "layer", "K->N", "m", "format", "path", "us", "cublas us", "floor us", "x cublas",
               "% bw", "target", ""});
  nlohmann::json rows = nlohmann::json::array();
  int with_target = 0, passed = 0;
  for (const Shape& s : kShapes) {
    if (std::find(f.models.begin(), f.models.end(), s.model) == f.models.end()) continue;
    const std::string kn = std::to_string(s.k) + "->" + std::to_string(s.n);

    // cuBLAS baseline: dense weights of the activation dtype, rotated the same way.
    std::vector<double> cublas_us(f.ms.size());
    {
      const int64_t bytes = s.n * s.k * 2;
      const size_t copies = copies_for(bytes, f.rotate_mb);
      std::vector<void*> ws(copies, nullptr);
      std::vector<uint16_t> host(static_cast<size_t>(s.n * s.k));
      Rng rng{11};
      for (auto& v : host) v = random_act_bits(rng, f16, 0.05f);
      for (auto& p : ws) {
        check(cudaMalloc(&p, static_cast<size_t>(bytes)), "cudaMalloc (cuBLAS weights)");
        check(cudaMemcpy(p, host.data(), static_cast<size_t>(bytes), cudaMemcpyHostToDevice), "cudaMemcpy");
      }
      for (size_t mi = 0; mi < f.ms.size(); ++mi) {
        const int m = static_cast<int>(f.ms[mi]);
        const float alpha = 1.0f, beta = 0.0f;
        cublas_us[mi] = time_calls(stream, copies, f.min_seconds, [&](size_t c) {
                          check(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(s.n), m,
                                             static_cast<int>(s.k), &alpha, ws[c], cuda_act, static_cast<int>(s.k),
                                             d_x, cuda_act, static_cast<int>(s.k), &beta, d_y, cuda_act,
                                             static_cast<int>(s.n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                                "cublasGemmEx");
                        }).us_median;
      }
      for (void* p : ws) cudaFree(p);
    }

    for (const Format* fm : formats) {
      cuda::Gemm gemm(act, stream);  // owns (and frees) this format's weight copies
      const HostQuant h = make_quant(s, *fm, 1234 + static_cast<uint64_t>(s.n));
      const size_t copies = copies_for(h.w.bytes(), f.rotate_mb);
      std::vector<WeightMatrix> ws;
      for (size_t c = 0; c < copies; ++c) ws.push_back(gemm.upload(h.w));
      for (size_t mi = 0; mi < f.ms.size(); ++mi) {
        const int64_t m = f.ms[mi];
        const Timing t = time_calls(stream, copies, f.min_seconds, [&](size_t c) {
          gemm.linear(ws[c], d_x, m, nullptr, DType::F32, d_y);
        });
        const double bytes = static_cast<double>(h.w.bytes() + (m * s.k + m * s.n) * 2);
        const double floor_us = bytes / (copy_bw * 1e3);
        const double speedup = cublas_us[mi] / t.us_median;
        const double bw_pct = 100.0 * floor_us / t.us_median;
        const Target tg = target_for(fm->bits, m);
        std::string target, verdict;
        if (tg.speedup > 0) {
          ++with_target;
          target = ">=" + fmt(tg.speedup, 1) + "x";
          bool ok = speedup >= tg.speedup;
          if (tg.bw_pct > 0) {
            target += ", >=" + fmt(tg.bw_pct, 0) + "% bw";
            ok = ok && bw_pct >= tg.bw_pct;
          }
          verdict = ok ? "pass" : "miss";
          passed += ok;
        }
        const cuda::GemmPath path = gemm.choose(ws[0], m);
        table.add_row({s.model, s.layer, kn, std::to_string(m), fm->name, path_name(path), fmt(t.us_median, 1),
                       fmt(cublas_us[mi], 1), fmt(floor_us, 1), fmt(speedup, 2), fmt(bw_pct, 0), target, verdict});
        nlohmann::json row = {{"model", s.model},
                              {"layer", s.layer},
                              {"k", s.k},
                              {"n", s.n},
                              {"m", m},
                              {"format", fm->name},
                              {"bits", fm->bits},
                              {"group", h.w.group},
                              {"path", path_name(path)},
                              {"weight_bytes", h.w.bytes()},
                              {"copies_rotated", copies},
                              {"us_median", t.us_median},
                              {"us_min", t.us_min},
                              {"samples", t.samples},
                              {"cublas_us_median", cublas_us[mi]},
                              {"floor_us", floor_us},
                              {"speedup_vs_cublas", speedup},
                              {"pct_of_copy_bw", bw_pct}};
        if (tg.speedup > 0) {
          row["target_speedup"] = tg.speedup;
          if (tg.bw_pct > 0) row["target_pct_of_copy_bw"] = tg.bw_pct;
          row["target_met"] = verdict == "pass";
        }
        rows.push_back(std::move(row));
      }
    }
    std::printf("  done %s %s\n", s.model, kn.c_str());
    std::fflush(stdout);
  }
  table.print();
  std::printf("targets met: %d of %d rows with a target (information only)\n", passed, with_target);
  std::printf("floor = (weight + x + y bytes) / copy bandwidth; %% bw = floor / ours; x cublas = cuBLAS %s us / ours\n",
              f.act.c_str());
  cublasDestroy(cublas);
  cudaFree(d_x);
  cudaFree(d_y);
  cudaStreamDestroy(stream);

  const nlohmann::json result = {{"activations", f.act},
                                 {"copy_bw_gbs", copy_bw},
                                 {"sm_count", prop.multiProcessorCount},
                                 {"int8_format", "column-wise (one scale per output channel)"},
                                 {"floor_bytes", "weights (codes + fp16 scales) + x + y"},
                                 {"targets_met", passed},
                                 {"rows_with_target", with_target},
                                 {"rows", rows}};
  write_result(f.out, "gemm", prop.name, result);
}

#else

void run(const Flags&) {
  throw Error("`fineserve bench gemm` needs the CUDA backend; this fineserve was built without CUDA");
}

#endif

void setup(CLI::App& group) {
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand("gemm", "CUDA quantized linear layer vs cuBLAS fp16 on OPT-13B/30B/175B shapes");
  cmd->add_option("--out", f->out, "JSON result path");
  cmd->add_option("--m", f->ms, "Token counts (M) to run")->delimiter(',');
  cmd->add_option("--models", f->models, "Shape sets: opt-175b, opt-30b, opt-13b")->delimiter(',');
  cmd->add_option("--formats", f->formats, "int4-g128, int4-col, int8-col")->delimiter(',');
  cmd->add_option("--act", f->act, "Activation dtype: f16 or bf16 (cuBLAS runs in the same dtype)");
  cmd->add_option("--min-seconds", f->min_seconds, "Minimum timed seconds per configuration");
  cmd->add_option("--rotate-mb", f->rotate_mb, "MB of weight copies rotated per configuration (> L2)");
  cmd->callback([f] { run(*f); });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
