// The CUDA quantized GEMM (kernels/cuda/gemm.h), every path, against the CPU reference linear on
// random inputs (skipped without a GPU).
#include <gtest/gtest.h>

#ifdef FINESERVE_HAVE_CUDA
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/reference.h"
#include "kernels/cuda/dequant.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_layout.h"
#include "kernels/half.h"
#include "quant/quantizer.h"
#include "tests/kernels/kernel_test_util.h"
#endif

namespace fineserve {
namespace {

#ifdef FINESERVE_HAVE_CUDA
using cuda::Gemm;
using cuda::GemmPath;

void cuda_ok(cudaError_t e, const char* what) { ASSERT_EQ(e, cudaSuccess) << what << ": " << cudaGetErrorString(e); }

// Device memory freed at scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { cudaMalloc(&ptr, bytes); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

const char* path_name(GemmPath p) {
  switch (p) {
    case GemmPath::Auto: return "Auto";
    case GemmPath::Gemv: return "Gemv";
    case GemmPath::TensorCore: return "TensorCore";
    case GemmPath::DequantCublas: return "DequantCublas";
  }
  return "?";
}

float act_to_float(uint16_t b, DType act) { return act == DType::F16 ? half_to_float(b) : bf16_to_float(b); }
uint16_t float_to_act(float v, DType act) { return act == DType::F16 ? float_to_half(v) : float_to_bf16(v); }

// The host side of one weight: the checkpoint-layout matrix and its dense fp32 values.
struct HostWeight {
  WeightMatrix w;
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scales;
  std::vector<float> offsets;  // asymmetric only
  std::vector<float> dense;  // [n, k]: code * scale (+ offset), or the dense weight
  std::vector<uint16_t> dense_bits;  // dense weights of F16/BF16 only
  std::vector<float> dense_f32;
};

HostWeight make_quantized(int bits, int64_t n, int64_t k, int64_t group, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> src(static_cast<size_t>(n * k));
  for (float& v : src) v = normal(rng);
  for (size_t i = 0; i < src.size(); i += 97) src[i] *= 8.0f;  // outliers, as real weights have
  quant::QuantizedMatrix q = quant::quantize({src.data(), DType::F32, n, k}, bits, group);
  HostWeight h;
  h.dense = quant::dequantize(q);
  h.codes = std::move(q.codes);
  h.scales = std::move(q.scales);
  h.w.rows = n;
  h.w.cols = k;
  h.w.bits = bits;
  h.w.group = group;
  h.w.dtype = bits == 4 ? DType::U8 : DType::I8;
  h.w.data = h.codes.data();
  h.w.scales = h.scales.data();
  return h;
}

HostWeight make_dense(DType dtype, int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  HostWeight h;
  h.dense.resize(static_cast<size_t>(n * k));
  for (float& v : h.dense) v = normal(rng);
  if (dtype == DType::F32) {
    h.dense_f32 = h.dense;
    h.w.data = h.dense_f32.data();
  } else {
    h.dense_bits.resize(h.dense.size());
    for (size_t i = 0; i < h.dense.size(); ++i) {
      h.dense_bits[i] = dtype == DType::F16 ? float_to_half(h.dense[i]) : float_to_bf16(h.dense[i]);
      h.dense[i] = dtype == DType::F16 ? half_to_float(h.dense_bits[i]) : bf16_to_float(h.dense_bits[i]);
    }
    h.w.data = h.dense_bits.data();
  }
  h.w.rows = n;
  h.w.cols = k;
  h.w.dtype = dtype;
  return h;
}

struct Bias {
  DType dtype = DType::F32;
  std::vector<uint8_t> bytes;  // host, of dtype
  std::vector<float> values;   // as the reference sees them
};

Bias make_bias(DType dtype, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-0.5f, 0.5f);
  Bias b;
  b.dtype = dtype;
  b.values.resize(static_cast<size_t>(n));
  b.bytes.resize(static_cast<size_t>(n) * dtype_size(dtype));
  for (int64_t i = 0; i < n; ++i) {
    float v = d(rng);
    if (dtype == DType::F32) {
      std::memcpy(b.bytes.data() + i * 4, &v, 4);
    } else {
      const uint16_t bits = dtype == DType::F16 ? float_to_half(v) : float_to_bf16(v);
      v = dtype == DType::F16 ? half_to_float(bits) : bf16_to_float(bits);
      std::memcpy(b.bytes.data() + i * 2, &bits, 2);
    }
    b.values[static_cast<size_t>(i)] = v;
  }
  return b;
}

// Runs y = x · wᵀ (+ bias) on the GPU through `path` for every m, and compares with the CPU reference.
//
// Tolerances, per element, with u the unit roundoff of the activation dtype (2^-11 fp16, 2^-8 bf16)
// and A = Σ_k |w[n][k] x[m][k]| (+ |bias|):
//  - Gemv / TensorCore feed the exact integer codes and x (exact in fp32 / on tensor cores) and
//    apply the fp32 scale once per group, so the only errors are the fp32 sums (<= (K + 2) 2^-24 A)
//    and the final rounding to the activation dtype (u |y|).
//  - DequantCublas and dense weights first round every weight to the activation dtype (<= u A more)
//    and add a bias rounded to the activation dtype (<= u |bias|).
// x is rounded to the activation dtype before the reference sees it, so it adds no error. A wrong
// element, scale or tail anywhere is off by about |w x| ~ 1e-2, far above these bounds.
void check_linear(Gemm& gemm, const HostWeight& h, const WeightMatrix& dev_w, DType act, int64_t m,
                  const Bias* bias, const std::vector<GemmPath>& paths, bool misalign_x, uint32_t seed) {
  const int64_t n = h.w.rows, k = h.w.cols;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<uint16_t> x_bits(static_cast<size_t>(m * k));
  std::vector<float> x(x_bits.size());
  for (size_t i = 0; i < x.size(); ++i) {
    float v = d(rng);
    if (v == 0.0f) v = 0.25f;
    x_bits[i] = float_to_act(v, act);
    x[i] = act_to_float(x_bits[i], act);
  }
  std::vector<float> want(static_cast<size_t>(m * n)), abs_sum(want.size());
  cpu::ref::linear(h.w, x.data(), m, bias ? bias->bytes.data() : nullptr, bias ? bias->dtype : DType::F32,
                   want.data());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) {
      double s = bias ? std::fabs(bias->values[static_cast<size_t>(r)]) : 0.0;
      for (int64_t c = 0; c < k; ++c) {
        // An asymmetric matrix's offsets are summed apart from the codes (offset · Σ x per group).
        const double o = h.w.offsets ? std::fabs(h.offsets[static_cast<size_t>(r * (k / h.w.group) + c / h.w.group)]) : 0.0;
        s += (std::fabs(static_cast<double>(h.dense[static_cast<size_t>(r * k + c)])) + o) *
             std::fabs(x[static_cast<size_t>(i * k + c)]);
      }
      abs_sum[static_cast<size_t>(i * n + r)] = static_cast<float>(s);
    }

  // x sits one element past an aligned address when misalign_x: the kernels' unaligned load paths.
  const size_t x_offset = misalign_x ? 2 : 0;
  DeviceBuffer d_x(x_bits.size() * 2 + 16), d_y(want.size() * 2), d_bias(bias ? bias->bytes.size() : 1);
  void* x_dev = static_cast<uint8_t*>(d_x.ptr) + x_offset;
  cuda_ok(cudaMemcpy(x_dev, x_bits.data(), x_bits.size() * 2, cudaMemcpyHostToDevice), "copy x");
  if (bias) cuda_ok(cudaMemcpy(d_bias.ptr, bias->bytes.data(), bias->bytes.size(), cudaMemcpyHostToDevice), "copy bias");

  const double u = act == DType::F16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
  const double acc_err = static_cast<double>(k + 2) * std::ldexp(1.0, -24);
  for (GemmPath path : paths) {
    const GemmPath taken = path == GemmPath::Auto ? gemm.choose(dev_w, m) : path;
    const bool rounds_weights = !h.w.quantized() || taken == GemmPath::DequantCublas;
    SCOPED_TRACE(std::string("path ") + path_name(path) + " (" + path_name(taken) + "), m " + std::to_string(m) +
                 ", bias " + (bias ? std::string(dtype_name(bias->dtype)) : "none") +
                 (misalign_x ? ", unaligned x" : ""));
    cuda_ok(cudaMemset(d_y.ptr, 0xff, want.size() * 2), "poison y");  // 0xffff: NaN in fp16 and bf16
    gemm.linear(dev_w, x_dev, m, bias ? d_bias.ptr : nullptr, bias ? bias->dtype : DType::F32, d_y.ptr, path);
    cuda_ok(cudaDeviceSynchronize(), "linear");
    std::vector<uint16_t> got_bits(want.size());
    cuda_ok(cudaMemcpy(got_bits.data(), d_y.ptr, got_bits.size() * 2, cudaMemcpyDeviceToHost), "copy y");
    size_t bad = 0, worst = 0;
    double worst_ratio = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      const double got = act_to_float(got_bits[i], act);
      const double b = bias ? std::fabs(bias->values[i % static_cast<size_t>(n)]) : 0.0;
      double tol = u * std::fabs(want[i]) + acc_err * abs_sum[i] + 1e-30;
      if (rounds_weights) tol += u * abs_sum[i] + u * b;
      tol *= 1.01;
      const double err = std::fabs(got - want[i]);
      if (!(err <= tol)) {  // NaN fails too
        if (bad == 0 || err / tol > worst_ratio) {
          worst_ratio = err / tol;
          worst = i;
        }
        ++bad;
      }
    }
    EXPECT_EQ(bad, 0u) << bad << " of " << want.size() << " outputs off; worst (token " << worst / n << ", row "
                       << worst % n << "): got " << act_to_float(got_bits[worst], act) << " want " << want[worst];
  }
}

struct QuantCase {
  int bits;
  int64_t n, k, group;  // group 0 = column-wise (k)
};

// N: 1, 8, 131, 520 (not multiples of the 128-row tile); K: not multiples of the 64-wide k tile
// where the format allows (96 with group 32, 200 / 130 / 131 column-wise), and long enough (4096)
// that split-K kicks in; groups 32, 64, 128 and column-wise.
const std::vector<QuantCase> kQuantCases = {
    {4, 8, 96, 32},   {8, 8, 96, 32},    {4, 131, 200, 0}, {8, 131, 200, 0},  {4, 520, 256, 64},
    {8, 520, 256, 64}, {4, 1, 64, 32},   {8, 1, 64, 0},    {4, 131, 130, 0},  {8, 8, 131, 0},
    {4, 131, 4096, 128}, {8, 131, 4096, 32}, {4, 520, 1024, 0},
};

void run_quant_cases(DType act) {
  cudaStream_t stream = nullptr;
  cuda_ok(cudaStreamCreate(&stream), "stream");
  {
    Gemm gemm(act, stream);
    const std::vector<GemmPath> all = {GemmPath::Gemv, GemmPath::TensorCore, GemmPath::DequantCublas,
                                       GemmPath::Auto};
    const DType bias_types[] = {DType::F32, DType::F16, DType::BF16};
    uint32_t seed = act == DType::F16 ? 1000 : 2000;
    for (const QuantCase& c : kQuantCases) {
      const int64_t group = c.group ? c.group : c.k;
      SCOPED_TRACE("int" + std::to_string(c.bits) + " n " + std::to_string(c.n) + " k " + std::to_string(c.k) +
                   " group " + std::to_string(group) + " act " + std::string(dtype_name(act)));
      const HostWeight h = make_quantized(c.bits, c.n, c.k, group, seed++);
      const WeightMatrix dev_w = gemm.upload(h.w);
      EXPECT_EQ(dev_w.rows, c.n);
      EXPECT_EQ(dev_w.cols, c.k);
      int variant = 0;
      for (int64_t m : {1, 3, 17, 129}) {
        // Cycle bias kinds (none, F32, F16, BF16) over the cases; x unaligned on every m = 3.
        const int kind = (variant++ + static_cast<int>(seed)) % 4;
        const Bias bias = make_bias(kind ? bias_types[kind - 1] : DType::F32, c.n, seed);
        check_linear(gemm, h, dev_w, act, m, kind ? &bias : nullptr, all, m == 3, seed * 7 + static_cast<uint32_t>(m));
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
    // Large m: Auto takes DequantCublas; the tensor-core path at a few hundred tokens too.
    const HostWeight h = make_quantized(4, 131, 200, 200, seed++);
    const WeightMatrix dev_w = gemm.upload(h.w);
    const Bias bias = make_bias(DType::F16, 131, seed);
    check_linear(gemm, h, dev_w, act, 600, &bias, {GemmPath::Auto, GemmPath::TensorCore}, false, seed);
    // A 67 MiB matrix (fp16): dequantized whole for one cuBLAS call, and through a 4 MiB
    // workspace in slabs of 256 rows (the last one short), as on a device short of memory.
    const HostWeight big = make_quantized(4, 4200, 8192, 128, seed++);
    const WeightMatrix dev_big = gemm.upload(big.w);
    check_linear(gemm, big, dev_big, act, 2, nullptr, {GemmPath::DequantCublas, GemmPath::Gemv, GemmPath::TensorCore},
                 false, seed);
    cuda::GemmOptions small_ws;
    small_ws.max_dequant_bytes = size_t{4} << 20;
    small_ws.poison_workspaces = true;
    Gemm slabs(act, stream, small_ws);
    const WeightMatrix dev_big2 = slabs.upload(big.w);
    const Bias big_bias = make_bias(DType::F32, 4200, seed);
    check_linear(slabs, big, dev_big2, act, 300, &big_bias, {GemmPath::DequantCublas}, false, seed + 1);
  }
  cuda_ok(cudaStreamDestroy(stream), "stream");
}
#endif

#ifdef FINESERVE_HAVE_CUDA
#define REQUIRE_GPU() \
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device"
#else
#define REQUIRE_GPU() GTEST_SKIP() << "built without CUDA"
#endif

TEST(CudaGemm, QuantizedF16MatchesReference) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  run_quant_cases(DType::F16);
#endif
}

TEST(CudaGemm, QuantizedBF16MatchesReference) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  run_quant_cases(DType::BF16);
#endif
}

TEST(CudaGemm, DenseWeightsMatchReference) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  for (DType act : {DType::F16, DType::BF16}) {
    Gemm gemm(act, nullptr);
    uint32_t seed = 3000;
    for (DType wt : {DType::F32, DType::F16, DType::BF16}) {
      SCOPED_TRACE(std::string("dense ") + std::string(dtype_name(wt)) + " act " + std::string(dtype_name(act)));
      const HostWeight h = make_dense(wt, 131, 200, seed++);
      const WeightMatrix dev_w = gemm.upload(h.w);
      EXPECT_EQ(dev_w.dtype, act);
      EXPECT_EQ(gemm.choose(dev_w, 1), GemmPath::DequantCublas);
      const Bias bias = make_bias(DType::BF16, 131, seed);
      for (int64_t m : {1, 17}) check_linear(gemm, h, dev_w, act, m, m == 1 ? &bias : nullptr, {GemmPath::Auto}, false, seed);
    }
  }
#endif
}

TEST(CudaGemm, AutoPicksByTokenCount) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  Gemm gemm(DType::F16, nullptr);
  const HostWeight h = make_quantized(4, 8, 64, 32, 1);
  const WeightMatrix w = gemm.upload(h.w);
  EXPECT_EQ(gemm.choose(w, 1), GemmPath::Gemv);
  EXPECT_EQ(gemm.choose(w, 64), GemmPath::TensorCore);
  EXPECT_EQ(gemm.choose(w, 8192), GemmPath::DequantCublas);
  // Non-decreasing: Gemv, then TensorCore, then DequantCublas.
  int last = 0;
  for (int64_t m = 1; m <= 8192; m *= 2) {
    const GemmPath p = gemm.choose(w, m);
    const int rank = p == GemmPath::Gemv ? 0 : p == GemmPath::TensorCore ? 1 : 2;
    EXPECT_GE(rank, last) << "m " << m;
    last = rank;
  }
#endif
}

TEST(CudaGemm, ZeroTokensWritesNothing) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  Gemm gemm(DType::F16, nullptr);
  const HostWeight h = make_quantized(8, 8, 64, 64, 2);
  const WeightMatrix w = gemm.upload(h.w);
  DeviceBuffer y(16);
  cuda_ok(cudaMemset(y.ptr, 0xab, 16), "memset");
  gemm.linear(w, y.ptr, 0, nullptr, DType::F32, y.ptr);
  cuda_ok(cudaDeviceSynchronize(), "sync");
  uint8_t host[16];
  cuda_ok(cudaMemcpy(host, y.ptr, 16, cudaMemcpyDeviceToHost), "copy");
  for (uint8_t b : host) EXPECT_EQ(b, 0xab);
#endif
}

TEST(CudaGemm, RejectsMalformedWeights) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  Gemm gemm(DType::BF16, nullptr);
  HostWeight h = make_quantized(4, 8, 96, 32, 3);
  WeightMatrix bad = h.w;
  bad.group = 48;  // not a power of two
  EXPECT_THROW(gemm.upload(bad), Error);
  bad = h.w;
  bad.bits = 3;
  EXPECT_THROW(gemm.upload(bad), Error);
  bad = h.w;
  bad.scales = nullptr;
  EXPECT_THROW(gemm.upload(bad), Error);
  EXPECT_THROW(Gemm(DType::F32, nullptr), Error);
#endif
}


// Split-K slices that end inside a g128 group (5 forced slices of K = 4096: every slice boundary is
// 64 codes into a group), on both split paths, with NaN-poisoned workspaces: a slice that folds a
// group's partial sum with the wrong scale, or a reduction that reads a slot no slice wrote, is off.
TEST(CudaGemm, SplitKBoundaryInsideAGroup) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  cuda::GemmOptions o;
  o.force_splits = 5;
  o.poison_workspaces = true;
  for (DType act : {DType::F16, DType::BF16}) {
    Gemm gemm(act, nullptr, o);
    uint32_t seed = act == DType::F16 ? 4000 : 4100;
    for (int bits : {4, 8}) {
      SCOPED_TRACE("int" + std::to_string(bits) + " act " + std::string(dtype_name(act)));
      const int64_t k = 4096, group = 128, elems = bits == 4 ? 32 : 16;
      // The slices really do end inside groups, on both paths.
      const auto gemv = cuda::layout::plan_forced_split(k / elems, o.force_splits, 1 << 20);
      const auto tc = cuda::layout::plan_forced_split(k / 64, o.force_splits, 1 << 20);
      ASSERT_EQ(gemv.splits, 5);
      ASSERT_EQ(tc.splits, 5);
      ASSERT_NE(gemv.per_split * elems % group, 0);
      ASSERT_NE(tc.per_split * 64 % group, 0);
      const HostWeight h = make_quantized(bits, 131, k, group, seed++);
      const WeightMatrix dev_w = gemm.upload(h.w);
      const Bias bias = make_bias(DType::F32, 131, seed);
      for (int64_t m : {1, 3, 17})
        check_linear(gemm, h, dev_w, act, m, m == 17 ? &bias : nullptr, {GemmPath::Gemv, GemmPath::TensorCore},
                     m == 3, seed * 7 + static_cast<uint32_t>(m));
    }
  }
#endif
}

// Asymmetric matrices (per-group offsets) on every path and both activation dtypes, including
// split-K slices that end inside a group (the offsets' part must be added once per group, by the
// slice holding the group's end) and column-wise groups, with poisoned workspaces.
TEST(CudaGemm, AsymmetricEveryPathMatchesReference) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  const QuantCase cases[] = {{4, 8, 96, 32},     {8, 8, 96, 32},      {4, 131, 200, 0}, {8, 131, 200, 0},
                             {4, 520, 256, 64},  {4, 131, 4096, 128}, {8, 131, 4096, 32}, {4, 1, 64, 32}};
  for (int64_t splits : {0, 5}) {
    cuda::GemmOptions o;
    o.force_splits = splits;
    o.poison_workspaces = true;
    for (DType act : {DType::F16, DType::BF16}) {
      Gemm gemm(act, nullptr, o);
      uint32_t seed = 4500 + static_cast<uint32_t>(splits) * 100 + (act == DType::F16 ? 0 : 50);
      for (const QuantCase& c : cases) {
        const int64_t group = c.group ? c.group : c.k;
        SCOPED_TRACE("asymmetric int" + std::to_string(c.bits) + " n " + std::to_string(c.n) + " k " +
                     std::to_string(c.k) + " group " + std::to_string(group) + " act " +
                     std::string(dtype_name(act)) + " splits " + std::to_string(splits));
        HostWeight h = make_quantized(c.bits, c.n, c.k, group, seed++);
        testing::make_asymmetric(h.w, h.offsets, &h.dense, seed++);
        const WeightMatrix dev_w = gemm.upload(h.w);
        ASSERT_NE(dev_w.offsets, nullptr);
        const Bias bias = make_bias(DType::F32, c.n, seed);
        for (int64_t m : {1, 3, 17, 70})
          check_linear(gemm, h, dev_w, act, m, m == 17 ? &bias : nullptr,
                       {GemmPath::Gemv, GemmPath::TensorCore, GemmPath::DequantCublas}, m == 3,
                       seed * 7 + static_cast<uint32_t>(m));
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
  }
#endif
}

// Every path once at awkward sizes (N not a multiple of the 128-row tile, K not of the 64-wide k
// tile, group 32, column-wise, a K long enough to split), with NaN-poisoned workspaces. Small on
// purpose: gpu_check.sh runs it under compute-sanitizer's memcheck, racecheck and initcheck.
TEST(CudaGemm, EveryPathAtAwkwardSizesWithPoisonedWorkspaces) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  cuda::GemmOptions o;
  o.poison_workspaces = true;
  Gemm gemm(DType::F16, nullptr, o);
  const QuantCase cases[] = {{4, 131, 200, 0}, {8, 8, 96, 32}, {4, 131, 4096, 128}};
  uint32_t seed = 4200;
  for (const QuantCase& c : cases) {
    const int64_t group = c.group ? c.group : c.k;
    SCOPED_TRACE("int" + std::to_string(c.bits) + " n " + std::to_string(c.n) + " k " + std::to_string(c.k) +
                 " group " + std::to_string(group));
    const HostWeight h = make_quantized(c.bits, c.n, c.k, group, seed++);
    const WeightMatrix dev_w = gemm.upload(h.w);
    const Bias bias = make_bias(DType::F16, c.n, seed);
    check_linear(gemm, h, dev_w, DType::F16, 3, &bias, {GemmPath::Gemv, GemmPath::TensorCore, GemmPath::DequantCublas},
                 true, seed);
  }
#endif
}

// Real OPT-175B sizes: fc1 (N 49152, K 12288) and fc2 (K 49152) at M = 1, 64 and 8192. Needs
// ~4 GB of device memory and a minute, so it runs only where FINESERVE_GPU_LARGE_TESTS=1
// (scripts/gpu_check.sh sets it). The CPU reference covers a random sample of outputs.
TEST(CudaGemmRealSize, Opt175bShapesMatchTheReferenceOnSampledOutputs) {
  REQUIRE_GPU();
#ifdef FINESERVE_HAVE_CUDA
  const char* gate = std::getenv("FINESERVE_GPU_LARGE_TESTS");
  if (!gate || std::string(gate) != "1") GTEST_SKIP() << "set FINESERVE_GPU_LARGE_TESTS=1 to run real-size shapes";
  struct Shape {
    int64_t n, k;
  };
  for (const Shape s : {Shape{49152, 12288}, Shape{12288, 49152}}) {
    SCOPED_TRACE("n " + std::to_string(s.n) + " k " + std::to_string(s.k));
    // Codes and scales drawn directly (quantizing 600M weights on the host would take minutes).
    std::mt19937_64 rng(static_cast<uint64_t>(s.n * 31 + s.k));
    HostWeight h;
    h.w.rows = s.n;
    h.w.cols = s.k;
    h.w.bits = 4;
    h.w.group = 128;
    h.w.dtype = DType::U8;
    h.codes.resize(static_cast<size_t>(s.n * s.k / 2));
    for (size_t i = 0; i < h.codes.size(); i += 8) {
      uint64_t r = rng();
      for (size_t j = 0; j < 8 && i + j < h.codes.size(); ++j, r >>= 8) h.codes[i + j] = static_cast<uint8_t>(r);
    }
    h.scales.resize(static_cast<size_t>(s.n * (s.k / 128)));
    for (auto& v : h.scales) v = float_to_half(0.002f + static_cast<float>(rng() % 1000) * 2e-6f);
    h.w.data = h.codes.data();
    h.w.scales = h.scales.data();
    Gemm gemm(DType::F16, nullptr);
    const WeightMatrix dev_w = gemm.upload(h.w);
    // w[r][c] from the checkpoint layout: int4 codes are nibbles (low first) holding code + 8.
    auto weight = [&](int64_t r, int64_t c) {
      const uint8_t b = h.codes[static_cast<size_t>((r * s.k + c) / 2)];
      const int code = ((c % 2) ? b >> 4 : b & 0xF) - 8;
      return static_cast<double>(code) * half_to_float(h.scales[static_cast<size_t>(r * (s.k / 128) + c / 128)]);
    };
    for (int64_t m : {1, 64, 8192}) {
      SCOPED_TRACE("m " + std::to_string(m) + " path " + path_name(gemm.choose(dev_w, m)));
      std::vector<uint16_t> x(static_cast<size_t>(m * s.k));
      std::uniform_real_distribution<float> d(-1.0f, 1.0f);
      for (auto& v : x) v = float_to_half(d(rng));
      DeviceBuffer d_x(x.size() * 2), d_y(static_cast<size_t>(m * s.n) * 2);
      ASSERT_NE(d_x.ptr, nullptr);
      ASSERT_NE(d_y.ptr, nullptr);
      cuda_ok(cudaMemcpy(d_x.ptr, x.data(), x.size() * 2, cudaMemcpyHostToDevice), "copy x");
      cuda_ok(cudaMemset(d_y.ptr, 0xff, static_cast<size_t>(m * s.n) * 2), "poison y");
      gemm.linear(dev_w, d_x.ptr, m, nullptr, DType::F32, d_y.ptr);
      cuda_ok(cudaDeviceSynchronize(), "linear");
      std::vector<uint16_t> y(static_cast<size_t>(m * s.n));
      cuda_ok(cudaMemcpy(y.data(), d_y.ptr, y.size() * 2, cudaMemcpyDeviceToHost), "copy y");
      // 256 sampled outputs against the fp64 sum, with check_linear's bound for the path (the
      // DequantCublas path also rounds each weight to fp16).
      const bool rounds_weights = gemm.choose(dev_w, m) == GemmPath::DequantCublas;
      size_t bad = 0;
      for (int i = 0; i < 256; ++i) {
        const int64_t t = static_cast<int64_t>(rng() % static_cast<uint64_t>(m));
        const int64_t r = static_cast<int64_t>(rng() % static_cast<uint64_t>(s.n));
        double want = 0, abs_sum = 0;
        for (int64_t c = 0; c < s.k; ++c) {
          const double p = weight(r, c) * half_to_float(x[static_cast<size_t>(t * s.k + c)]);
          want += p;
          abs_sum += std::fabs(p);
        }
        const double u = std::ldexp(1.0, -11);
        double tol = u * std::fabs(want) + static_cast<double>(s.k + 2) * std::ldexp(1.0, -24) * abs_sum;
        if (rounds_weights) tol += u * abs_sum;
        const double got = half_to_float(y[static_cast<size_t>(t * s.n + r)]);
        if (!(std::fabs(got - want) <= tol * 1.01)) {
          if (bad++ < 5) ADD_FAILURE() << "token " << t << " row " << r << ": got " << got << " want " << want;
        }
      }
      EXPECT_EQ(bad, 0u);
    }
  }
#endif
}

}  // namespace
}  // namespace fineserve
