// The CPU backend's kernel paths forced in turn (kernels/cpu/dispatch.h): the exact weight-only
// linear layer and the optional int8-activation (W4A8 / W8A8) one, against the reference on awkward
// shapes, with the extreme codes (-8 / -128 and 7 / 127) in every weight. A path this CPU lacks is
// skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "configs/cpu_env.h"
#include "kernels/base.h"
#include "kernels/cpu/act_quant.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/dispatch.h"
#include "kernels/half.h"
#include "tests/kernels/kernel_test_util.h"

namespace fineserve {
namespace {

using cpu::Isa;

// A quantized weight in the checkpoint layout with its storage and exact dequantized values.
struct QWeight {
  WeightMatrix w;
  std::vector<uint8_t> data;
  std::vector<uint16_t> scales;
  std::vector<float> offsets;  // asymmetric only
  std::vector<float> dense;  // [rows, cols]

  // |w| per element, plus |offset| when asymmetric (the kernels carry the offset apart): what the
  // fp32 rounding bounds scale with.
  std::vector<float> magnitudes() const {
    std::vector<float> m(dense.size());
    const int64_t groups = w.cols / w.group;
    for (size_t i = 0; i < m.size(); ++i) {
      const int64_t r = static_cast<int64_t>(i) / w.cols, c = static_cast<int64_t>(i) % w.cols;
      m[i] = std::fabs(dense[i]) + (w.offsets ? std::fabs(offsets[static_cast<size_t>(r * groups + c / w.group)]) : 0.0f);
    }
    return m;
  }
};

QWeight make_qweight(int64_t rows, int64_t cols, int bits, int64_t group, uint32_t seed) {
  std::mt19937 rng(seed);
  QWeight t;
  t.w.rows = rows;
  t.w.cols = cols;
  t.w.bits = bits;
  t.w.dtype = bits == 8 ? DType::I8 : DType::U8;
  t.w.group = group;
  const int64_t groups = cols / group;
  std::uniform_real_distribution<float> sd(0.002f, 0.05f);
  t.scales.resize(static_cast<size_t>(rows * groups));
  for (auto& s : t.scales) s = float_to_half(sd(rng));
  const int lo = bits == 8 ? -128 : -8, hi = bits == 8 ? 127 : 7;
  std::uniform_int_distribution<int> cd(lo, hi);
  std::vector<int> codes(static_cast<size_t>(rows * cols));
  for (int& c : codes) c = cd(rng);
  // Every row holds both extremes, at columns that land in different nibble positions of the
  // packed int4 layout (the two's complement nibble of columns 28..31 included).
  for (int64_t r = 0; r < rows; ++r) {
    codes[static_cast<size_t>(r * cols + (r % cols))] = lo;
    codes[static_cast<size_t>(r * cols + ((r + 29) % cols))] = lo;
    codes[static_cast<size_t>(r * cols + ((r + 7) % cols))] = hi;
  }
  if (bits == 8) {
    t.data.resize(codes.size());
    for (size_t i = 0; i < codes.size(); ++i) t.data[i] = static_cast<uint8_t>(static_cast<int8_t>(codes[i]));
  } else {
    t.data.assign(codes.size() / 2, 0);
    for (size_t i = 0; i < codes.size(); ++i) t.data[i / 2] |= static_cast<uint8_t>((codes[i] + 8) << (i % 2 ? 4 : 0));
  }
  t.dense.resize(codes.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      t.dense[static_cast<size_t>(r * cols + c)] =
          static_cast<float>(codes[static_cast<size_t>(r * cols + c)]) *
          half_to_float(t.scales[static_cast<size_t>(r * groups + c / group)]);
  t.w.data = t.data.data();
  t.w.scales = t.scales.data();
  return t;
}

// Activations with a few large outliers (what makes per-block scales matter) and exact zeros.
std::vector<float> make_acts(int64_t m, int64_t k, uint32_t seed) {
  std::vector<float> x = testing::random_floats(static_cast<size_t>(m * k), seed);
  for (size_t i = 0; i < x.size(); i += 37) x[i] *= 20.0f;
  for (size_t i = 5; i < x.size(); i += 53) x[i] = 0.0f;
  return x;
}

// Per output: Σ |x| |w| (the magnitude fp32 rounding scales with) and the bound on what quantizing
// x to int8 per block can change: Σ |w| · scale_x / 2 over the row.
struct Bounds {
  std::vector<double> mag, quant;
};

Bounds bounds(const std::vector<float>& dense, int64_t n_rows, int64_t k, const std::vector<float>& x, int64_t m) {
  Bounds b;
  b.mag.resize(static_cast<size_t>(m * n_rows));
  b.quant.resize(b.mag.size());
  for (int64_t i = 0; i < m; ++i) {
    std::vector<float> half_step(static_cast<size_t>(k));
    for (int64_t c0 = 0; c0 < k; c0 += cpu::kActBlock) {
      float amax = 0;
      for (int64_t c = c0; c < std::min(k, c0 + cpu::kActBlock); ++c) amax = std::max(amax, std::fabs(x[static_cast<size_t>(i * k + c)]));
      for (int64_t c = c0; c < std::min(k, c0 + cpu::kActBlock); ++c) half_step[static_cast<size_t>(c)] = amax / 127.0f / 2.0f;
    }
    for (int64_t n = 0; n < n_rows; ++n) {
      double mag = 0, q = 0;
      for (int64_t c = 0; c < k; ++c) {
        const double w = std::fabs(dense[static_cast<size_t>(n * k + c)]);
        mag += w * std::fabs(x[static_cast<size_t>(i * k + c)]);
        q += w * half_step[static_cast<size_t>(c)];
      }
      b.mag[static_cast<size_t>(i * n_rows + n)] = mag;
      b.quant[static_cast<size_t>(i * n_rows + n)] = q;
    }
  }
  return b;
}

std::vector<float> exact_product(const std::vector<float>& dense, int64_t n_rows, int64_t k, const std::vector<float>& x,
                                 int64_t m) {
  std::vector<float> y(static_cast<size_t>(m * n_rows));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t n = 0; n < n_rows; ++n) {
      double s = 0;
      for (int64_t c = 0; c < k; ++c) s += static_cast<double>(x[static_cast<size_t>(i * k + c)]) * dense[static_cast<size_t>(n * k + c)];
      y[static_cast<size_t>(i * n_rows + n)] = static_cast<float>(s);
    }
  return y;
}

const Isa kFastIsas[] = {Isa::Avx2, Isa::Avx512Vnni};

class ForcedIsa : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!cpu::isa_supported(GetParam())) GTEST_SKIP() << "this CPU lacks " << cpu::isa_name(GetParam());
  }
  // Two threads so that the parallel split over row tiles runs too.
  std::unique_ptr<Backend> fast(bool int8_act, bool int8_dense = false) const {
    return make_cpu_backend(CpuOptions{.threads = 2, .isa = GetParam(), .int8_activations = int8_act, .int8_dense_weights = int8_dense});
  }
  static std::unique_ptr<Backend> reference(bool int8_act, bool int8_dense = false) {
    return make_cpu_backend(CpuOptions{.reference = true, .int8_activations = int8_act, .int8_dense_weights = int8_dense});
  }
};

struct Shape {
  int64_t n, k, group;  // group 0: column-wise (K)
};

// K with a 3·2^n factor (96, 192, 768, 1536), group 32 and column-wise, N not a multiple of the
// 4-row tile; column-wise K = 770 / 99 end in a partial block of 32.
const Shape kShapes[] = {{37, 96, 32}, {37, 96, 0}, {13, 768, 32}, {13, 768, 0}, {6, 1536, 32},
                         {5, 192, 64}, {130, 192, 32}, {3, 770, 0}};
const int64_t kRows[] = {1, 2, 3, 5, 8, 16, 17, 129};

TEST_P(ForcedIsa, Int8ActivationsMatchTheReferenceAndStayWithinTheQuantizationBound) {
  auto f = fast(true), r = reference(true), exact = reference(false);
  uint32_t seed = 10;
  for (int variant = 0; variant < 4; ++variant) {  // int4 / int8, symmetric / asymmetric
    const int bits = variant % 2 ? 8 : 4;
    const bool asym = variant >= 2;
    std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
    if (bits == 8) shapes.push_back({9, 99, 0});  // int8 allows an odd K
    for (const Shape& s : shapes) {
      for (int64_t m : kRows) {
        if (m * s.n * s.k > 1'200'000) continue;  // quick under ASan
        const int64_t group = s.group ? s.group : s.k;
        const bool f16 = asym && seed % 2 == 0;  // every other asymmetric case: offsets stored as fp16
        SCOPED_TRACE("bits=" + std::to_string(bits) + " m=" + std::to_string(m) + " N=" + std::to_string(s.n) +
                     " K=" + std::to_string(s.k) + " group=" + std::to_string(group) + (asym ? " asymmetric" : "") +
                     (f16 ? " fp16-offsets" : ""));
        QWeight t = make_qweight(s.n, s.k, bits, group, seed++);
        if (asym) testing::make_asymmetric(t.w, t.offsets, &t.dense, seed++, f16);
        const std::vector<float> x = make_acts(m, s.k, seed++);
        std::vector<float> bias = testing::random_floats(static_cast<size_t>(s.n), seed++);
        const bool with_bias = (m + s.n) % 2 == 0;
        std::vector<float> yf(static_cast<size_t>(m * s.n)), yr(yf.size()), ye(yf.size());
        testing::poison(yf);
        testing::poison(yr);
        f->linear(f->upload_weight(t.w), x.data(), m, with_bias ? bias.data() : nullptr, DType::F32, yf.data());
        r->linear(r->upload_weight(t.w), x.data(), m, with_bias ? bias.data() : nullptr, DType::F32, yr.data());
        exact->linear(exact->upload_weight(t.w), x.data(), m, with_bias ? bias.data() : nullptr, DType::F32, ye.data());

        const Bounds b = bounds(t.magnitudes(), s.n, s.k, x, m);
        std::vector<double> tight(yf.size()), loose(yf.size());
        for (size_t i = 0; i < yf.size(); ++i) {
          // Same integer sums; only fp32 rounding of the per-block and per-group scaling differs.
          tight[i] = 1e-5 * (b.mag[i] + b.quant[i]) + 1e-6;
          loose[i] = b.quant[i] * (1 + 1e-3) + tight[i];
        }
        testing::expect_close(yf, yr, 0, 0, "int8-activation kernel vs its reference", tight);
        testing::expect_close(yr, ye, 0, 0, "int8 activations vs the exact product", loose);
      }
    }
  }
}

TEST_P(ForcedIsa, ExactPathMatchesTheReference) {
  auto f = fast(false), r = reference(false);
  uint32_t seed = 500;
  for (int variant = 0; variant < 4; ++variant) {  // int4 / int8, symmetric / asymmetric
    const int bits = variant % 2 ? 8 : 4;
    const bool asym = variant >= 2;
    for (const Shape& s : kShapes) {
      for (int64_t m : kRows) {
        if (m * s.n * s.k > 1'200'000) continue;
        const int64_t group = s.group ? s.group : s.k;
        const bool f16 = asym && seed % 2 == 0;  // every other asymmetric case: offsets stored as fp16
        SCOPED_TRACE("bits=" + std::to_string(bits) + " m=" + std::to_string(m) + " N=" + std::to_string(s.n) +
                     " K=" + std::to_string(s.k) + " group=" + std::to_string(group) + (asym ? " asymmetric" : "") +
                     (f16 ? " fp16-offsets" : ""));
        QWeight t = make_qweight(s.n, s.k, bits, group, seed++);
        if (asym) testing::make_asymmetric(t.w, t.offsets, &t.dense, seed++, f16);
        const std::vector<float> x = make_acts(m, s.k, seed++);
        std::vector<float> yf(static_cast<size_t>(m * s.n)), yr(yf.size());
        testing::poison(yf);
        f->linear(f->upload_weight(t.w), x.data(), m, nullptr, DType::F32, yf.data());
        r->linear(r->upload_weight(t.w), x.data(), m, nullptr, DType::F32, yr.data());
        const Bounds b = bounds(t.magnitudes(), s.n, s.k, x, m);
        std::vector<double> tol(yf.size());
        // fp32 accumulation in any order, including the int4 kernel's +8 offset carried per group.
        for (size_t i = 0; i < yf.size(); ++i) tol[i] = 1e-5 * b.mag[i] * (bits == 4 ? 8 : 1) + 1e-6;
        testing::expect_close(yf, yr, 0, 0, "exact kernel vs reference", tol);
      }
    }
  }
}

// The LM-head option: a dense fp16 weight quantized to int8 at upload, through both linear paths.
TEST_P(ForcedIsa, Int8DenseWeightsMatchTheReference) {
  const int64_t n = 45, k = 576;  // SmolLM2's d_model: 9 · 64
  std::vector<float> wf = testing::random_floats(static_cast<size_t>(n * k), 3, -0.1f, 0.1f);
  const std::vector<uint16_t> wh = testing::to_half_bits(wf, false);
  for (size_t i = 0; i < wf.size(); ++i) wf[i] = half_to_float(wh[i]);
  WeightMatrix w;
  w.rows = n;
  w.cols = k;
  w.dtype = DType::F16;
  w.data = wh.data();
  for (bool int8_act : {false, true}) {
    for (int64_t m : {1, 5}) {
      SCOPED_TRACE("int8 activations " + std::to_string(int8_act) + " m=" + std::to_string(m));
      const std::vector<float> x = make_acts(m, k, 4);
      auto f = fast(int8_act, true), r = reference(int8_act, true);
      std::vector<float> yf(static_cast<size_t>(m * n)), yr(yf.size());
      f->linear(f->upload_weight(w), x.data(), m, nullptr, DType::F32, yf.data());
      r->linear(r->upload_weight(w), x.data(), m, nullptr, DType::F32, yr.data());
      const Bounds b = bounds(wf, n, k, x, m);
      std::vector<double> tight(yf.size()), loose(yf.size());
      const std::vector<float> ye = exact_product(wf, n, k, x, m);
      for (size_t i = 0; i < yf.size(); ++i) {
        tight[i] = 1e-5 * (b.mag[i] + b.quant[i]) + 1e-6;
        // int8 weights: |w - s·q| <= s / 2 <= |w|max / 254 per element, plus the activation bound.
        loose[i] = b.mag[i] / 100.0 + (int8_act ? 1.01 * b.quant[i] : 0.0) + tight[i];
      }
      testing::expect_close(yf, yr, 0, 0, "fast vs reference", tight);
      testing::expect_close(yr, ye, 0, 0, "int8 weights vs the fp16 product", loose);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllPaths, ForcedIsa, ::testing::ValuesIn(kFastIsas),
                         [](const ::testing::TestParamInfo<Isa>& i) {
                           return i.param == Isa::Avx2 ? std::string("avx2") : std::string("avx512_vnni");
                         });

TEST(CpuDispatch, NamesRoundTripAndTheBestPathIsSupported) {
  for (Isa isa : {Isa::Reference, Isa::Avx2, Isa::Avx512Vnni}) EXPECT_EQ(cpu::parse_isa(cpu::isa_name(isa)), isa);
  EXPECT_EQ(cpu::parse_isa("avx512"), Isa::Avx512Vnni);
  EXPECT_FALSE(cpu::parse_isa("sse2").has_value());
  EXPECT_TRUE(cpu::isa_supported(Isa::Reference));
  EXPECT_TRUE(cpu::isa_supported(cpu::best_isa()));
  if (cpu::isa_supported(Isa::Avx512Vnni)) {
    EXPECT_EQ(cpu::best_isa(), Isa::Avx512Vnni);
  }
  EXPECT_NO_THROW(make_cpu_backend(CpuOptions{.isa = Isa::Reference}));
  for (Isa isa : kFastIsas) {
    if (cpu::isa_supported(isa)) {
      EXPECT_NO_THROW(make_cpu_backend(CpuOptions{.isa = isa}));
    } else {
      EXPECT_THROW(make_cpu_backend(CpuOptions{.isa = isa}), Error);
    }
  }
  // The int8-activation option needs quantized weights; dense ones keep the exact path.
  auto be = make_cpu_backend(CpuOptions{.int8_activations = true});
  const std::vector<float> w = {1, 2, 3, 4}, x = {0.5f, -1.0f};
  WeightMatrix d;
  d.rows = 2;
  d.cols = 2;
  d.dtype = DType::F32;
  d.data = w.data();
  std::vector<float> y(2);
  be->linear(be->upload_weight(d), x.data(), 1, nullptr, DType::F32, y.data());
  EXPECT_EQ(y, (std::vector<float>{-1.5f, -2.5f}));
}

// setenv in a test binary: restored at the end of the test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) ::setenv(name_, old_.c_str(), 1);
    else ::unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

TEST(CpuEnv, OverridesAreReadAndBadValuesRejected) {
  {
    ScopedEnv isa("FINESERVE_CPU_ISA", "reference"), act("FINESERVE_CPU_INT8_ACT", "1"), head("FINESERVE_CPU_INT8_HEAD", "0");
    const CpuOptions o = cpu_options_from_env();
    EXPECT_EQ(o.isa, Isa::Reference);
    EXPECT_TRUE(o.int8_activations);
    EXPECT_FALSE(o.int8_dense_weights);
    EXPECT_EQ(make_cpu_backend(o)->name(), "cpu-reference");  // what the server and benchmarks do
  }
  {
    ScopedEnv isa("FINESERVE_CPU_ISA", "avx9000");
    EXPECT_THROW(cpu_options_from_env(), Error);
  }
  {
    ScopedEnv act("FINESERVE_CPU_INT8_ACT", "maybe");
    EXPECT_THROW(cpu_options_from_env(), Error);
  }
}

}  // namespace
}  // namespace fineserve
