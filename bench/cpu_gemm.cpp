// `fineserve bench cpu-gemm`: the CPU backend's linear layer on OPT-1.3B's layer shapes at decode
// batch 1 and 8 and batched m = 16, 64, 128, for int4 (group 128 and column-wise), int8
// (column-wise) and dense fp16 through the exact weight-only path, and int4 / int8 through the
// int8-activation path ("a8"), against the machine's read bandwidth and peak multiply-add rates
// measured in the same run.
//
// Small m is memory-bound: the figure of merit is GB/s of weight bytes (WeightMatrix::bytes():
// codes + fp16 scales, or fp16 values) and its share of the measured read bandwidth; the int4
// speedup is against the fp16 time on the same shape. Large m is compute-bound: the figure is
// multiply-adds per second as a share of the peak rate of the arithmetic the path uses (fp32 FMA
// for the exact path, int8 dot products for a8). Several copies of each weight are rotated so
// that the bytes touched exceed the last-level cache and every call streams from DRAM.
// Derived figures use the best call time, like the bandwidth they are compared with (best of
// several passes): on a machine shared with other work the best call is the one that ran
// undisturbed. The median is printed and recorded too.
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench/membw.h"
#include "bench/report.h"
#include "configs/cpu_env.h"
#include "kernels/base.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/half.h"

namespace fineserve::bench {
namespace {

struct Shape {
  const char* name;
  int64_t k, n;
};

struct Format {
  const char* name;
  int bits;       // 0 = dense fp16
  int64_t group;  // 0 = column-wise (K)
  bool int8_act = false;
};

struct HostWeight {
  WeightMatrix w;
  std::vector<uint8_t> data;
  std::vector<uint16_t> scales;
};

HostWeight make_host_weight(const Shape& s, const Format& f, uint32_t seed) {
  std::mt19937 rng(seed);
  HostWeight h;
  h.w.rows = s.n;
  h.w.cols = s.k;
  h.w.bits = f.bits;
  if (f.bits == 0) {
    h.w.dtype = DType::F16;
    std::vector<uint16_t> v(static_cast<size_t>(s.n * s.k));
    std::normal_distribution<float> d(0.0f, 0.02f);
    for (auto& x : v) x = float_to_half(d(rng));
    h.data.resize(v.size() * 2);
    std::memcpy(h.data.data(), v.data(), h.data.size());
  } else {
    h.w.dtype = f.bits == 8 ? DType::I8 : DType::U8;
    h.w.group = f.group ? f.group : s.k;
    h.data.resize(static_cast<size_t>(s.n * s.k * f.bits / 8));
    for (auto& b : h.data) b = static_cast<uint8_t>(rng());
    if (f.bits == 4)  // nibbles 1..15 (code + 8 never 0), as a quantizer writes them
      for (auto& b : h.data) b = static_cast<uint8_t>((b & 0xf ? b & 0xf : 1) | ((b >> 4 ? b >> 4 : 1) << 4));
    h.scales.resize(static_cast<size_t>(s.n * (s.k / h.w.group)));
    std::uniform_real_distribution<float> d(0.001f, 0.01f);
    for (auto& x : h.scales) x = float_to_half(d(rng));
    h.w.scales = h.scales.data();
  }
  h.w.data = h.data.data();
  return h;
}

// The 1-minute load average: a benchmark on a busy machine says so in its result.
double load_average() {
  std::ifstream in("/proc/loadavg");
  double l = -1;
  in >> l;
  return l;
}

struct Timing {
  double us_median = 0, us_min = 0;
};

// Seconds of CPU time this process has used (all threads).
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Median and best µs per call over the rotating copies, after one warm-up pass. cpu_clock: the
// process's CPU time per call divided by the threads instead of wall time — what a call costs
// when it is not preempted, on a machine whose other work takes the cores away mid-call (with
// OpenMP's spinning workers it also counts their waits, so it never flatters).
Timing time_linear(Backend& be, const std::vector<WeightMatrix>& copies, const std::vector<float>& x, int64_t m,
                   std::vector<float>& y, double min_seconds, bool cpu_clock, int threads) {
  for (const auto& w : copies) be.linear(w, x.data(), m, nullptr, DType::F32, y.data());
  std::vector<double> us;
  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0;; ++i) {
    const double c0 = cpu_clock ? process_cpu_seconds() : 0;
    const auto t0 = std::chrono::steady_clock::now();
    be.linear(copies[i % copies.size()], x.data(), m, nullptr, DType::F32, y.data());
    const auto t1 = std::chrono::steady_clock::now();
    us.push_back(cpu_clock ? (process_cpu_seconds() - c0) * 1e6 / threads
                           : std::chrono::duration<double, std::micro>(t1 - t0).count());
    if (us.size() >= 20 && std::chrono::duration<double>(t1 - start).count() >= min_seconds) break;
  }
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us.front()};
}

void run(const std::string& out, int threads, double min_seconds, double rotate_mb, const std::vector<int64_t>& ms,
         bool cpu_clock) {
  const std::vector<Shape> shapes = {{"qkv 2048->6144", 2048, 6144},
                                     {"out_proj 2048->2048", 2048, 2048},
                                     {"fc1 2048->8192", 2048, 8192},
                                     {"fc2 8192->2048", 8192, 2048}};
  const std::vector<Format> formats = {{"fp16", 0, 0},           {"int4 g128", 4, 128},
                                       {"int4 col", 4, 0},       {"int8 col", 8, 0},
                                       {"int4 g128 a8", 4, 128, true}, {"int8 col a8", 8, 0, true}};
  // The environment's ISA choice (FINESERVE_CPU_ISA), so each kernel path can be timed on one machine.
  CpuOptions options = cpu_options_from_env();
  options.threads = threads;
  options.int8_activations = false;
  options.int8_dense_weights = false;
  if (options.reference) throw Error("bench cpu-gemm times the fast kernels: FINESERVE_CPU_ISA=reference is not one");
  auto be = make_cpu_backend(options);
  const cpu::Isa isa = options.isa.value_or(cpu::best_isa());
  const double load_before = load_average();
  std::printf("backend %s (%s), measuring read bandwidth and compute peaks ...\n", be->name().c_str(),
              std::string(cpu::isa_name(isa)).c_str());
  const double bw_before = measure_read_bandwidth_gbs(threads);
  if (threads <= 0) threads = omp_get_max_threads();
  const ComputePeak peak = measure_compute_peak(threads, cpu_clock);
  std::printf("read bandwidth: %.1f GB/s; peak GMAC/s: fp32 FMA avx2 %.1f, avx512 %.1f; int8 avx2 %.1f, vnni %.1f\n",
              bw_before, peak.fp32_fma_avx2, peak.fp32_fma_avx512, peak.int8_avx2, peak.int8_vnni_avx512);
  // The ceiling of each path: the exact GEMM's fp32 FMAs (512-bit on the AVX-512 path, 256-bit on
  // AVX2); a8 the int8 dot products of the ISA it dispatches to.
  const double exact_peak = isa == cpu::Isa::Avx512Vnni ? peak.fp32_fma_avx512 : peak.fp32_fma_avx2;
  const double a8_peak = isa == cpu::Isa::Avx512Vnni ? peak.int8_vnni_avx512 : peak.int8_avx2;

  Table table({"shape", "m", "format", "MB", "us best", "us median", "GB/s", "% of bw", "x vs fp16", "GMAC/s",
               "% of peak"});
  nlohmann::json rows = nlohmann::json::array();
  for (const Shape& s : shapes) {
    std::vector<double> fp16_us(ms.size(), 0.0);
    for (const Format& f : formats) {
      // A fresh backend per weight: the copies it packs are freed before the next format's.
      CpuOptions o = options;
      o.int8_activations = f.int8_act;
      auto b = make_cpu_backend(o);
      const HostWeight h = make_host_weight(s, f, 42);
      const double mb = static_cast<double>(h.w.bytes()) / 1e6;
      const size_t n_copies = static_cast<size_t>(std::max(2.0, rotate_mb / mb + 1));
      std::vector<WeightMatrix> copies;
      for (size_t c = 0; c < n_copies; ++c) copies.push_back(b->upload_weight(h.w));
      for (size_t mi = 0; mi < ms.size(); ++mi) {
        const int64_t m = ms[mi];
        std::mt19937 rng(7);
        std::normal_distribution<float> d(0.0f, 1.0f);
        std::vector<float> x(static_cast<size_t>(m * s.k)), y(static_cast<size_t>(m * s.n));
        for (auto& v : x) v = d(rng);
        const Timing t = time_linear(*b, copies, x, m, y, min_seconds, cpu_clock, threads);
        if (f.bits == 0) fp16_us[mi] = t.us_min;
        const double gbs = static_cast<double>(h.w.bytes()) / (t.us_min * 1e3);
        const double speedup = fp16_us[mi] / t.us_min;
        const double gmacs = static_cast<double>(m * s.n * s.k) / (t.us_min * 1e3);
        const double path_peak = f.int8_act ? a8_peak : exact_peak;
        const double pct_peak = path_peak > 0 ? 100 * gmacs / path_peak : 0;
        table.add_row({s.name, std::to_string(m), f.name, fmt(mb, 1), fmt(t.us_min, 1), fmt(t.us_median, 1),
                       fmt(gbs, 1), fmt(100 * gbs / bw_before, 0), fmt(speedup, 2), fmt(gmacs, 1), fmt(pct_peak, 0)});
        rows.push_back({{"shape", s.name},
                        {"k", s.k},
                        {"n", s.n},
                        {"m", m},
                        {"format", f.name},
                        {"weight_bytes", h.w.bytes()},
                        {"copies_rotated", n_copies},
                        {"us_median", t.us_median},
                        {"us_min", t.us_min},
                        {"weight_gbs_best", gbs},
                        {"pct_of_read_bw", 100 * gbs / bw_before},
                        {"speedup_vs_fp16", speedup},
                        {"int8_activations", f.int8_act},
                        {"gmacs_best", gmacs},
                        {"pct_of_path_peak", pct_peak}});
      }
    }
  }
  const double bw_after = measure_read_bandwidth_gbs(threads);
  table.print();
  std::printf("read bandwidth: %.1f GB/s before, %.1f GB/s after the runs; load average %.2f before, %.2f after\n",
              bw_before, bw_after, load_before, load_average());
  const nlohmann::json result = {{"backend", be->name()},
                                 {"isa", cpu::isa_name(isa)},
                                 {"threads", threads},
                                 {"clock", cpu_clock ? "process CPU time / threads" : "wall"},
                                 {"peak_gmacs", {{"fp32_fma_avx2", peak.fp32_fma_avx2},
                                                 {"fp32_fma_avx512", peak.fp32_fma_avx512},
                                                 {"int8_avx2", peak.int8_avx2},
                                                 {"int8_vnni_avx512", peak.int8_vnni_avx512}}},
                                 {"exact_path_peak", isa == cpu::Isa::Avx512Vnni ? "fp32_fma_avx512" : "fp32_fma_avx2"},
                                 {"a8_path_peak", isa == cpu::Isa::Avx512Vnni ? "int8_vnni_avx512" : "int8_avx2"},
                                 {"read_bw_gbs_before", bw_before},
                                 {"read_bw_gbs_after", bw_after},
                                 {"load_average_before", load_before},
                                 {"load_average_after", load_average()},
                                 {"rows", rows}};
  write_result(out, "cpu-gemm", cpu_name() + ", " + std::to_string(threads > 0 ? threads : 0) + " threads (0 = all)",
               result);
}

void setup(CLI::App& group) {
  struct Flags {
    std::string out = "docs/results/cpu_gemm.json";
    int threads = 0;
    double min_seconds = 0.5;
    double rotate_mb = 128;
    std::vector<int64_t> ms = {1, 8, 16, 64, 128};
    bool cpu_clock = false;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand("cpu-gemm", "CPU linear layer: int4/int8/fp16, exact and int8-activation paths");
  cmd->add_option("--out", f->out, "JSON result path");
  cmd->add_option("--threads", f->threads, "OpenMP threads (0 = all cores)");
  cmd->add_option("--min-seconds", f->min_seconds, "Minimum timed seconds per configuration");
  cmd->add_option("--rotate-mb", f->rotate_mb, "Total MB of weight copies rotated per configuration (> L3)");
  cmd->add_option("--m", f->ms, "Rows of x (tokens) to time");
  cmd->add_flag("--cpu-clock", f->cpu_clock,
                "Time calls and the compute probe by CPU time per thread instead of wall time (a busy machine)");
  cmd->callback([f] { run(f->out, f->threads, f->min_seconds, f->rotate_mb, f->ms, f->cpu_clock); });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
