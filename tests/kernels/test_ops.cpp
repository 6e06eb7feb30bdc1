// The fast CPU norms, activations, softmax, rotary, embedding and add against the reference.
// Tolerances: the reference works in double and rounds once; the fast kernels accumulate in fp32
// (a few ulp per op) and use polynomial exp / erfc good to ~2 ulp / 1.2e-7 relative, so results
// agree to a few 1e-6 relative unless stated.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_backend.h"
#include "kernels/cpu/fast_ops.h"
#include "kernels/cpu/reference.h"
#include "kernels/cpu/simd.h"
#include "kernels/half.h"
#include "tests/kernels/kernel_test_util.h"

namespace fineserve {
namespace {

using testing::expect_close;
using testing::poison;
using testing::random_floats;

class OpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cpu::has_avx2()) GTEST_SKIP() << "no AVX2: the CPU backend runs the reference only";
  }
  std::unique_ptr<Backend> fast = make_cpu_backend();
  std::unique_ptr<Backend> ref = make_cpu_backend(CpuOptions{.reference = true});
};

// A parameter vector in the given dtype and its exact fp32 values.
std::vector<uint8_t> params(const std::vector<float>& v, DType t) {
  std::vector<uint8_t> out(v.size() * dtype_size(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::F32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = t == DType::F16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

TEST_F(OpsTest, Norms) {
  uint32_t seed = 1;
  for (DType pt : {DType::F32, DType::F16, DType::BF16}) {
    for (int64_t n : {1, 7, 16, 100, 768, 5121}) {
      const int64_t m = 3;
      std::vector<float> x = random_floats(static_cast<size_t>(m * n), seed++, -3.0f, 5.0f);  // mean != 0
      const auto gamma = params(random_floats(static_cast<size_t>(n), seed++, 0.5f, 1.5f), pt);
      const auto beta = params(random_floats(static_cast<size_t>(n), seed++), pt);
      std::vector<float> yf(x.size()), yr(x.size());
      for (bool with_beta : {true, false}) {
        poison(yf);
        fast->layer_norm(x.data(), m, n, gamma.data(), with_beta ? beta.data() : nullptr, pt, 1e-5f, yf.data());
        ref->layer_norm(x.data(), m, n, gamma.data(), with_beta ? beta.data() : nullptr, pt, 1e-5f, yr.data());
        // Normalised values are O(1); fp32 mean/variance over n elements.
        expect_close(yf, yr, 2e-5, 2e-5, "layer_norm n=" + std::to_string(n));
      }
      poison(yf);
      fast->rms_norm(x.data(), m, n, gamma.data(), pt, 1e-6f, yf.data());
      ref->rms_norm(x.data(), m, n, gamma.data(), pt, 1e-6f, yr.data());
      expect_close(yf, yr, 1e-6, 1e-5, "rms_norm n=" + std::to_string(n));
    }
  }
  // In place (y == x) and a large parallel batch.
  std::vector<float> x = random_floats(64 * 1024, 77), xr = x, y(x.size());
  fast->rms_norm(x.data(), 64, 1024, nullptr, DType::F32, 1e-6f, x.data());
  ref->rms_norm(xr.data(), 64, 1024, nullptr, DType::F32, 1e-6f, y.data());
  expect_close(x, y, 1e-6, 1e-5, "rms_norm in place, no gamma");
}

TEST_F(OpsTest, Activations) {
  for (Activation kind : {Activation::ReLU, Activation::GELU, Activation::GELUTanh, Activation::SiLU}) {
    for (int64_t count : {1, 9, 1000, 70001}) {
      std::vector<float> x = random_floats(static_cast<size_t>(count), 5 + static_cast<uint32_t>(count), -12.0f, 12.0f);
      if (count > 8) {
        x[0] = 0.0f;
        x[1] = -30.0f;
        x[2] = 30.0f;
        x[3] = 1e-7f;
        x[4] = -100.0f;
        x[5] = 90.0f;
      }
      std::vector<float> yf = x, yr = x;
      fast->activation(kind, yf.data(), count);
      ref->activation(kind, yr.data(), count);
      expect_close(yf, yr, 1e-7, 2e-6, "activation " + std::to_string(static_cast<int>(kind)));
    }
    for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{1, 5}, {3, 8}, {4, 2730}, {17, 100}}) {
      const std::vector<float> gu = random_floats(static_cast<size_t>(m * 2 * n), 31, -6.0f, 6.0f);
      std::vector<float> of(static_cast<size_t>(m * n)), orf(of.size());
      poison(of);
      fast->gated_activation(kind, gu.data(), m, n, of.data());
      ref->gated_activation(kind, gu.data(), m, n, orf.data());
      expect_close(of, orf, 1e-7, 2e-6, "gated activation");
    }
  }
}

TEST_F(OpsTest, AddAndSoftmax) {
  for (int64_t count : {1, 13, 200003}) {
    std::vector<float> x = random_floats(static_cast<size_t>(count), 3), y = random_floats(static_cast<size_t>(count), 4);
    std::vector<float> xf = x, xr = x;
    fast->add(xf.data(), y.data(), count);
    ref->add(xr.data(), y.data(), count);
    expect_close(xf, xr, 0, 0, "add");  // one rounding each, identical
  }
  for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {2, 7}, {3, 50257}, {40, 100}}) {
    std::vector<float> x = random_floats(static_cast<size_t>(m * n), 9, -20.0f, 20.0f);
    if (n > 3) {
      x[1] = -std::numeric_limits<float>::infinity();  // a masked logit gets exactly 0
      x[2] = -200.0f;
    }
    std::vector<float> yf(x.size()), yr(x.size());
    poison(yf);
    cpu::softmax(x.data(), m, n, yf.data());
    cpu::ref::softmax(x.data(), m, n, yr.data());
    expect_close(yf, yr, 1e-9, 1e-5, "softmax");
    if (n > 3) {
      EXPECT_EQ(yf[1], 0.0f);
    }
  }
}

TEST_F(OpsTest, Rotary) {
  for (auto [hd, rd] : std::vector<std::pair<int, int>>{{64, 64}, {64, 32}, {80, 80}, {128, 64}, {6, 4}}) {
    const int64_t n_tokens = 5;
    const int nh = 4, nkv = 2;
    std::vector<int32_t> pos = {0, 1, 17, 2047, 100000};
    std::vector<float> inv(static_cast<size_t>(rd / 2));
    for (int i = 0; i < rd / 2; ++i) inv[static_cast<size_t>(i)] = std::pow(10000.0f, -2.0f * i / rd);
    std::vector<float> q = random_floats(static_cast<size_t>(n_tokens * nh * hd), 5);
    std::vector<float> k = random_floats(static_cast<size_t>(n_tokens * nkv * hd), 6);
    std::vector<float> qf = q, kf = k, qr = q, kr = k;
    fast->rotary(qf.data(), kf.data(), pos.data(), n_tokens, nh, nkv, hd, rd, inv.data());
    ref->rotary(qr.data(), kr.data(), pos.data(), n_tokens, nh, nkv, hd, rd, inv.data());
    // Same fp32 angle; sin/cos to < 1 ulp and one fp32 FMA per output.
    expect_close(qf, qr, 1e-6, 1e-5, "rotary q");
    expect_close(kf, kr, 1e-6, 1e-5, "rotary k");
    // Dimensions past rotary_dim are untouched.
    for (int64_t t = 0; t < n_tokens; ++t)
      for (int h = 0; h < nh; ++h)
        for (int e = rd; e < hd; ++e) {
          const size_t i = static_cast<size_t>((t * nh + h) * hd + e);
          EXPECT_EQ(qf[i], q[i]);
        }
  }
}

TEST_F(OpsTest, Embedding) {
  for (DType t : {DType::F32, DType::F16, DType::BF16}) {
    for (int64_t dim : {1, 7, 768}) {
      const int64_t rows = 50;
      const auto table = params(random_floats(static_cast<size_t>(rows * dim), 12), t);
      std::vector<int32_t> ids = {3, 0, 49, 3, 17};
      for (int i = 0; i < 200; ++i) ids.push_back((i * 37) % 50);  // enough tokens to go parallel
      const int64_t n = static_cast<int64_t>(ids.size());
      for (bool acc : {false, true}) {
        std::vector<float> base = random_floats(static_cast<size_t>(n * dim), 13);
        std::vector<float> of = base, orf = base;
        if (!acc) poison(of);
        fast->embedding(table.data(), t, dim, ids.data(), n, acc, of.data());
        ref->embedding(table.data(), t, dim, ids.data(), n, acc, orf.data());
        expect_close(of, orf, 0, 0, "embedding");  // a copy, or one fp32 add
      }
    }
  }
}

}  // namespace
}  // namespace fineserve
