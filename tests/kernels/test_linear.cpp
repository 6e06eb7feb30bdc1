// The fast CPU linear layer against the reference, and the reference against an independent
// dequantize-then-dense product in double.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/reference.h"
#include "kernels/cpu/simd.h"
#include "kernels/half.h"
#include "tests/kernels/kernel_test_util.h"

namespace fineserve {
namespace {

// A weight matrix with the storage it points into.
struct TestWeight {
  WeightMatrix w;
  std::vector<uint8_t> data;
  std::vector<uint16_t> scales;
  std::vector<float> offsets;  // asymmetric only
  std::vector<float> dense;  // the exact fp32 value of every element, [rows, cols], computed here
};

// bits 4 / 8: random codes (including the -8 a quantizer never writes) and fp16 scales; bits 0:
// dense of `dtype`.
TestWeight make_weight(int64_t rows, int64_t cols, int bits, int64_t group, DType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  TestWeight t;
  t.w.rows = rows;
  t.w.cols = cols;
  t.w.bits = bits;
  t.dense.resize(static_cast<size_t>(rows * cols));
  if (bits == 0) {
    t.w.dtype = dtype;
    t.data.resize(static_cast<size_t>(rows * cols) * dtype_size(dtype));
    std::normal_distribution<float> d(0.0f, 0.05f);
    for (int64_t i = 0; i < rows * cols; ++i) {
      float v = d(rng);
      if (dtype == DType::F16) {
        const uint16_t h = float_to_half(v);
        std::memcpy(t.data.data() + 2 * i, &h, 2);
        v = half_to_float(h);
      } else if (dtype == DType::BF16) {
        const uint16_t h = float_to_bf16(v);
        std::memcpy(t.data.data() + 2 * i, &h, 2);
        v = bf16_to_float(h);
      } else {
        std::memcpy(t.data.data() + 4 * i, &v, 4);
      }
      t.dense[static_cast<size_t>(i)] = v;
    }
  } else {
    t.w.dtype = bits == 8 ? DType::I8 : DType::U8;
    t.w.group = group;
    const int64_t groups = cols / group;
    t.scales.resize(static_cast<size_t>(rows * groups));
    std::uniform_real_distribution<float> sd(0.002f, 0.05f);
    for (auto& s : t.scales) s = float_to_half(sd(rng));
    const int qmax = bits == 8 ? 127 : 7;
    std::uniform_int_distribution<int> cd(-qmax - 1, qmax);
    std::vector<int> codes(static_cast<size_t>(rows * cols));
    for (int& c : codes) c = cd(rng);
    if (bits == 8) {
      t.data.resize(codes.size());
      for (size_t i = 0; i < codes.size(); ++i) t.data[i] = static_cast<uint8_t>(static_cast<int8_t>(codes[i]));
    } else {
      // Packed as the checkpoint stores it: element 2j low nibble, 2j+1 high, each code + 8.
      t.data.assign(codes.size() / 2, 0);
      for (size_t i = 0; i < codes.size(); ++i)
        t.data[i / 2] |= static_cast<uint8_t>((codes[i] + 8) << (i % 2 ? 4 : 0));
    }
    // The dequantized values, computed from the unpacked codes (not through the library).
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        t.dense[static_cast<size_t>(r * cols + c)] =
            static_cast<float>(codes[static_cast<size_t>(r * cols + c)]) *
            half_to_float(t.scales[static_cast<size_t>(r * groups + c / group)]);
    t.w.scales = t.scales.data();
  }
  t.w.data = t.data.data();
  return t;
}

struct Expected {
  std::vector<float> y;    // exact-ish (double) product
  std::vector<double> tol;  // per output: the fp32 accumulation error allowance
};

// y = x · denseᵀ + bias in double. The tolerance allows fp32 accumulation in any order: a few
// times sqrt(K) roundings of the magnitudes the kernel adds up — |x||w| and, for int4, the
// |x| * 8 * scale of the +8 offset the fast kernel carries through each group's partial sum.
Expected expected_product(const TestWeight& t, const std::vector<float>& x, int64_t m, const std::vector<float>& bias) {
  const int64_t N = t.w.rows, K = t.w.cols;
  Expected e;
  e.y.resize(static_cast<size_t>(m * N));
  e.tol.resize(e.y.size());
  const double eps = std::ldexp(1.0, -24);
  std::vector<double> wmag(t.dense.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      double a = std::fabs(t.dense[static_cast<size_t>(n * K + k)]);
      if (t.w.quantized()) {
        const size_t gi = static_cast<size_t>(n * (K / t.w.group) + k / t.w.group);
        if (t.w.bits == 4) a += 8.0 * half_to_float(t.scales[gi]);
        if (t.w.offsets) a += std::fabs(t.offsets[gi]) + 8.0 * half_to_float(t.scales[gi]);  // offset carried apart
      }
      wmag[static_cast<size_t>(n * K + k)] = a;
    }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      double s = 0, mag = 0;
      const float* xi = x.data() + i * K;
      const float* wn = t.dense.data() + n * K;
      const double* an = wmag.data() + n * K;
      for (int64_t k = 0; k < K; ++k) {
        s += static_cast<double>(xi[k]) * wn[k];
        mag += std::fabs(xi[k]) * an[k];
      }
      const double b = bias.empty() ? 0.0 : bias[static_cast<size_t>(n)];
      e.y[static_cast<size_t>(i * N + n)] = static_cast<float>(s + b);
      e.tol[static_cast<size_t>(i * N + n)] = 4.0 * std::sqrt(static_cast<double>(K)) * eps * mag + 2 * eps * std::fabs(s + b) + 1e-30;
    }
  }
  return e;
}

struct Case {
  int64_t m, n, k;
  int bits;
  int64_t group;  // 0: K itself
  DType dtype;
  bool bias;
  bool asymmetric = false;
  bool fp16_offsets = false;  // asymmetric with offsets that are exactly fp16 values (stored so)
};

std::string describe(const Case& c) {
  return "m=" + std::to_string(c.m) + " N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) +
         " bits=" + std::to_string(c.bits) + " group=" + std::to_string(c.group ? c.group : c.k) + " dtype=" +
         std::string(dtype_name(c.dtype)) + (c.bias ? " bias" : "") + (c.asymmetric ? " asymmetric" : "") +
         (c.fp16_offsets ? " fp16-offsets" : "");
}

void run_case(Backend& fast, Backend& ref, const Case& c, uint32_t seed) {
  SCOPED_TRACE(describe(c));
  TestWeight t = make_weight(c.n, c.k, c.bits, c.group ? c.group : c.k, c.dtype, seed);
  if (c.asymmetric) testing::make_asymmetric(t.w, t.offsets, &t.dense, seed + 3, c.fp16_offsets);
  const std::vector<float> x = testing::random_floats(static_cast<size_t>(c.m * c.k), seed + 1);
  std::vector<float> bias_f;
  std::vector<uint16_t> bias_h;
  if (c.bias) {
    bias_f = testing::random_floats(static_cast<size_t>(c.n), seed + 2);
    bias_h = testing::to_half_bits(bias_f, false);
    for (size_t i = 0; i < bias_f.size(); ++i) bias_f[i] = half_to_float(bias_h[i]);  // F16 bias
  }
  const Expected e = expected_product(t, x, c.m, bias_f);

  const WeightMatrix wf = fast.upload_weight(t.w), wr = ref.upload_weight(t.w);
  std::vector<float> yf(static_cast<size_t>(c.m * c.n)), yr(yf.size()), yc(yf.size());
  testing::poison(yf);
  testing::poison(yr);
  testing::poison(yc);
  const void* b = c.bias ? bias_h.data() : nullptr;
  fast.linear(wf, x.data(), c.m, b, DType::F16, yf.data());
  ref.linear(wr, x.data(), c.m, b, DType::F16, yr.data());
  // The checkpoint-layout matrix straight into the fast backend goes through the reference too.
  if (c.m == 1) fast.linear(t.w, x.data(), c.m, b, DType::F16, yc.data());

  // Reference vs the independent double product: both sum exact products in double.
  testing::expect_close(yr, e.y, 0, 1e-6, "reference vs dequantize-then-dense");
  if (c.m == 1) testing::expect_close(yc, yr, 0, 0, "checkpoint-layout weight in the fast backend");
  testing::expect_close(yf, e.y, 0, 0, "fast vs exact", e.tol);
}

class LinearTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> fast = make_cpu_backend(CpuOptions{});
  std::unique_ptr<Backend> ref = make_cpu_backend(CpuOptions{.reference = true});
};

TEST_F(LinearTest, QuantizedAllGroupsAndShapes) {
  uint32_t seed = 100;
  for (int bits : {4, 8}) {
    for (int64_t m : {1, 3, 8, 17, 129}) {
      // (N, K, group): power-of-two groups, column-wise groups incl. K not a multiple of 32.
      for (auto [n, k, g] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
               {96, 96, 32}, {96, 96, 0}, {37, 768, 32}, {37, 768, 64}, {37, 768, 128}, {37, 768, 256},
               {37, 768, 0}, {5, 5120, 128}, {6, 5120, 1024}, {7, 5120, 0}, {21, 100, 0}, {3, 770, 0},
               {1, 64, 64}, {130, 256, 64}}) {
        if (m * n * k > 1'500'000) continue;  // keeps the double-precision references quick under ASan
        run_case(*fast, *ref, {m, n, k, bits, g, DType::I8, (n + m) % 2 == 0}, seed++);
      }
    }
  }
  // int8 allows an odd K (column-wise group).
  run_case(*fast, *ref, {3, 9, 99, 8, 0, DType::I8, true}, seed++);
}

// Per-group offsets (w = code * scale + offset) on every fast path (GEMV m <= 3, GEMM) and the
// reference, int4 and int8, all group kinds.
TEST_F(LinearTest, AsymmetricAllGroupsAndShapes) {
  uint32_t seed = 500;
  for (int bits : {4, 8}) {
    for (int64_t m : {1, 2, 3, 8, 17}) {
      for (auto [n, k, g] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
               {96, 96, 32}, {96, 96, 0}, {37, 768, 32}, {37, 768, 128}, {5, 5120, 1024}, {21, 100, 0}, {3, 770, 0},
               {130, 256, 64}}) {
        // Every other case has offsets that are exactly fp16 values: the packed fp16 storage.
        run_case(*fast, *ref, {m, n, k, bits, g, DType::I8, (n + m) % 2 == 0, true, seed % 2 == 0}, seed);
        ++seed;
      }
    }
  }
  run_case(*fast, *ref, {3, 9, 99, 8, 0, DType::I8, true, true}, seed++);
}

// The packed matrix keeps offsets as fp16 exactly when every one of them is an fp16 value.
TEST(PackWeight, OffsetsAreFp16OnlyWhenExact) {
  for (bool exact : {false, true}) {
    TestWeight t = make_weight(37, 768, 4, 32, DType::I8, 7);
    testing::make_asymmetric(t.w, t.offsets, nullptr, 8, exact);
    const cpu::PackedWeight p = cpu::pack_weight(t.w);
    EXPECT_EQ(p.offsets_f16, exact);
    EXPECT_EQ(p.offset_bytes, p.tiles * p.groups * 4 * (exact ? 2 : 4));
  }
}

// A matrix whose offsets are all zero computes exactly what the symmetric matrix does.
TEST_F(LinearTest, ZeroOffsetsEqualTheSymmetricMatrix) {
  TestWeight t = make_weight(37, 768, 4, 32, DType::U8, 77);
  const std::vector<float> x = testing::random_floats(static_cast<size_t>(5 * 768), 78);
  std::vector<float> zeros(static_cast<size_t>(37 * 768 / 32), 0.0f);
  WeightMatrix asym = t.w;
  asym.offsets = zeros.data();
  for (int64_t m : {1, 5}) {
    std::vector<float> ys(static_cast<size_t>(m * 37)), ya(ys.size());
    fast->linear(fast->upload_weight(t.w), x.data(), m, ys.data());
    fast->linear(fast->upload_weight(asym), x.data(), m, ya.data());
    testing::expect_close(ya, ys, 0, 1e-6, "zero offsets vs symmetric, m=" + std::to_string(m));
  }
}

TEST_F(LinearTest, DenseAllDtypes) {
  uint32_t seed = 900;
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    for (int64_t m : {1, 2, 3, 4, 8, 17, 129}) {
      for (auto [n, k] : std::vector<std::pair<int64_t, int64_t>>{{96, 96}, {37, 768}, {5, 5120}, {13, 99}, {1, 1}, {130, 300}}) {
        if (m * n * k > 1'500'000) continue;
        run_case(*fast, *ref, {m, n, k, 0, 0, dt, (n + m) % 2 == 1}, seed++);
      }
    }
  }
}

TEST_F(LinearTest, BiasDtypes) {
  const TestWeight t = make_weight(19, 64, 4, 32, DType::U8, 7);
  const std::vector<float> x = testing::random_floats(2 * 64, 8);
  const std::vector<float> bias = testing::random_floats(19, 9);
  const auto bias_bf16 = testing::to_half_bits(bias, true);
  const WeightMatrix wf = fast->upload_weight(t.w);
  std::vector<float> y32(2 * 19), y16(2 * 19), yref(2 * 19);
  fast->linear(wf, x.data(), 2, bias.data(), DType::F32, y32.data());
  fast->linear(wf, x.data(), 2, bias_bf16.data(), DType::BF16, y16.data());
  ref->linear(ref->upload_weight(t.w), x.data(), 2, bias.data(), DType::F32, yref.data());
  testing::expect_close(y32, yref, 1e-5, 1e-5, "F32 bias");
  for (size_t i = 0; i < y16.size(); ++i)
    EXPECT_NEAR(y16[i] - y32[i], bf16_to_float(bias_bf16[i % 19]) - bias[i % 19], 1e-5) << i;
}

TEST_F(LinearTest, RejectsMalformedWeights) {
  TestWeight t = make_weight(4, 96, 4, 32, DType::U8, 1);
  WeightMatrix bad = t.w;
  bad.group = 48;  // not a power of two
  EXPECT_THROW(fast->upload_weight(bad), Error);
  EXPECT_THROW(ref->upload_weight(bad), Error);
  bad = t.w;
  bad.group = 192;  // does not divide 96... and is not K
  EXPECT_THROW(fast->upload_weight(bad), Error);
  bad = t.w;
  bad.bits = 3;
  EXPECT_THROW(fast->upload_weight(bad), Error);
  bad = t.w;
  bad.cols = 95;
  bad.group = 95;  // int4 needs even K
  EXPECT_THROW(fast->upload_weight(bad), Error);
  bad = t.w;
  bad.scales = nullptr;
  EXPECT_THROW(fast->upload_weight(bad), Error);
  WeightMatrix dense_i32;
  dense_i32.rows = 2;
  dense_i32.cols = 2;
  dense_i32.dtype = DType::I32;
  dense_i32.data = t.data.data();
  EXPECT_THROW(fast->upload_weight(dense_i32), Error);
}

TEST(CpuBackend, Names) {
  EXPECT_EQ(make_cpu_backend(CpuOptions{.reference = true})->name(), "cpu-reference");
  EXPECT_EQ(make_cpu_backend()->act_dtype(), DType::F32);
  if (cpu::has_avx2()) {
    EXPECT_EQ(make_cpu_backend()->name(), "cpu");
  }
}

TEST(CpuBackend, MemoryAndCopies) {
  auto be = make_cpu_backend();
  void* p = be->alloc(1000);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
  std::vector<uint8_t> src(1000), dst(1000);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7);
  be->copy_to_device(p, src.data(), 1000);
  void* q = be->alloc(1000);
  be->copy(q, p, 1000);
  be->copy_to_host(dst.data(), q, 1000);
  be->synchronize();
  EXPECT_EQ(src, dst);
  be->free(p);
  be->free(q);
  const void* u = be->upload(src.data(), 1000);
  EXPECT_EQ(std::memcmp(u, src.data(), 1000), 0);
  std::vector<float> f = {1.5f, -2.0f}, out(2);
  be->to_host_f32(f.data(), 2, out.data());
  EXPECT_EQ(out, f);
}

}  // namespace
}  // namespace fineserve
