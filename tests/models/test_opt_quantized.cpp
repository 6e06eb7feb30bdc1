// FineQuant OPT checkpoints of the golden fixtures:
//  1. exactness of the quantized path: the model on int8/int4 codes gives the same logits as the
//     same model on the dequantized weights stored densely (fp32), up to accumulation order;
//  2. accuracy against transformers' fp16 logits, within bounds derived from the quantizer's error
//     (see the comment on kBounds).
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/backend.h"
#include "models/checkpoint/safetensors.h"
#include "models/model.h"
#include "quant/convert.h"
#include "quant/quantizer.h"
#include "golden_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::prefill_logits;
using testing::rel_max_error;

const fs::path kGolden = fs::path(FINESERVE_TEST_DATA) / "golden";

struct Scratch {
  fs::path path = fs::temp_directory_path() / ("fineserve-qgold-" + std::to_string(::getpid()) + "-" +
                                               ::testing::UnitTest::GetInstance()->current_test_info()->name());
  Scratch() { fs::create_directories(path); }
  ~Scratch() { fs::remove_all(path); }
};

// ||a - b||_F / ||b||_F over all logits.
double rel_fro_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// Fraction of positions whose argmax token agrees.
double top1_agreement(const std::vector<float>& a, const std::vector<float>& b, int64_t vocab) {
  const size_t rows = a.size() / static_cast<size_t>(vocab);
  size_t same = 0;
  for (size_t r = 0; r < rows; ++r) {
    const auto* pa = a.data() + r * vocab;
    const auto* pb = b.data() + r * vocab;
    same += std::max_element(pa, pa + vocab) - pa == std::max_element(pb, pb + vocab) - pb;
  }
  return static_cast<double>(same) / static_cast<double>(rows);
}

// Writes `q` with every .qweight/.scales pair replaced by the dequantized fp32 .weight.
void write_dequantized(const fs::path& q, const fs::path& out) {
  const ckpt::Checkpoint c = ckpt::Checkpoint::open(q);
  const int bits = std::stoi(c.metadata().at("bits"));
  std::vector<std::string> names;
  for (const auto* t : c.tensors()) {
    if (t->name.ends_with(".scales")) continue;
    names.push_back(t->name.ends_with(".qweight") ? t->name.substr(0, t->name.size() - 8) + ".weight" : t->name);
  }
  fs::create_directories(out);
  ckpt::CheckpointWriter w(out, names, {}, 1ull << 40);
  for (const auto* t : c.tensors()) {
    if (t->name.ends_with(".scales")) continue;
    const ckpt::TensorView v = c.get(t->name);
    if (!t->name.ends_with(".qweight")) {
      w.add(t->name, t->dtype, t->shape, std::span<const std::byte>(v.data, v.nbytes()));
      continue;
    }
    const std::string stem = t->name.substr(0, t->name.size() - 8);
    const ckpt::TensorView s = c.get(stem + ".scales");
    quant::QuantizedMatrix m;
    m.rows = t->shape[0];
    m.cols = bits == 4 ? t->shape[1] * 2 : t->shape[1];
    m.bits = bits;
    m.group = m.cols / s.shape()[1];
    m.codes.resize(v.nbytes());
    std::memcpy(m.codes.data(), v.data, v.nbytes());
    m.scales.resize(static_cast<size_t>(s.numel()));
    std::memcpy(m.scales.data(), s.data, s.nbytes());
    const std::vector<float> dense = quant::dequantize(m);
    w.add(stem + ".weight", DType::F32, {m.rows, m.cols}, std::as_bytes(std::span(dense)));
  }
  w.finish();
  auto config = nlohmann::json::parse(std::ifstream(q / "config.json"));
  config.erase("quantization_config");
  std::ofstream(out / "config.json") << config.dump();
}

// Bounds against transformers' fp16-weight logits, as ||Δlogits||_F / ||logits||_F and the share of
// positions whose top-1 token agrees. Quantization errors of the model's n = 12 matrices add up
// roughly like independent noise, so the logit error is about sqrt(n) x the per-matrix relative
// weight error ε (quant_report.json): int8 ε ≈ 0.008 -> ~0.03, int4 ε ≈ 0.12-0.15 -> ~0.45.
// Measured on these fixtures: int8 0.014-0.028 (top-1 >= 0.88), int4 0.26-0.48. The bounds leave
// ~2x head room. These random models have nearly flat logits, so int4's top-1 agreement is low and
// not asserted; what pins int4 down is the exact comparison with the dequantized dense model.
struct Bound {
  int bits;
  double max_rel_fro;
  double min_top1;
};
constexpr Bound kBounds[] = {{8, 0.06, 0.75}, {4, 0.9, 0.0}};

class OptQuantized : public ::testing::TestWithParam<std::string> {};

TEST_P(OptQuantized, MatchesDequantizedDenseAndStaysNearTransformers) {
  const fs::path dir = kGolden / GetParam();
  const auto golden = nlohmann::json::parse(std::ifstream(dir / "golden.json"));
  const ckpt::Checkpoint gold_logits = ckpt::Checkpoint::open(dir / "golden.safetensors");
  for (const Bound& bound : kBounds) {
    Scratch tmp;
    quant::ConvertOptions o;
    o.model = dir;
    o.out = tmp.path / "q";
    o.group.bits = bound.bits;
    o.keep = quant::default_keep_patterns();
    quant::convert_checkpoint(o);
    write_dequantized(o.out, tmp.path / "deq");

    auto backend = make_cpu_backend();
    auto quantized = load_model(o.out, *backend);
    auto dense = load_model(tmp.path / "deq", *backend);
    EXPECT_EQ(quantized->info().quantization, "finequant-int" + std::to_string(bound.bits));
    for (size_t i = 0; i < golden["prompts"].size(); ++i) {
      const auto ids = golden["prompts"][i]["ids"].get<std::vector<int32_t>>();
      const std::vector<float> q = prefill_logits(*quantized, ids);
      const std::vector<float> d = prefill_logits(*dense, ids);
      EXPECT_LE(rel_max_error(q, d), 1e-4) << GetParam() << " int" << bound.bits << " prompt " << i;

      const ckpt::TensorView t = gold_logits.get("logits." + std::to_string(i));
      std::vector<float> ref(static_cast<size_t>(t.numel()));
      std::memcpy(ref.data(), t.data, t.nbytes());
      const double fro = rel_fro_error(q, ref);
      const double top1 = top1_agreement(q, ref, quantized->info().vocab_size);
      EXPECT_LE(fro, bound.max_rel_fro) << GetParam() << " int" << bound.bits << " prompt " << i;
      EXPECT_GE(top1, bound.min_top1) << GetParam() << " int" << bound.bits << " prompt " << i;
      std::printf("%s int%d prompt %zu: logits vs transformers: rel Frobenius error %.4f, top-1 agreement %.2f\n",
                  GetParam().c_str(), bound.bits, i, fro, top1);
    }
  }
}

// On the fixture with planted outlier channels, the adaptive group size must beat column-wise int4.
TEST(OptQuantizedOutliers, AdaptiveBeatsColumnWise) {
  const fs::path dir = kGolden / "opt-outliers";
  const auto golden = nlohmann::json::parse(std::ifstream(dir / "golden.json"));
  const ckpt::Checkpoint gold_logits = ckpt::Checkpoint::open(dir / "golden.safetensors");
  Scratch tmp;
  double err[2] = {0, 0};
  for (int adaptive : {0, 1}) {
    quant::ConvertOptions o;
    o.model = dir;
    o.out = tmp.path / (adaptive ? "adaptive" : "colwise");
    o.group.bits = 4;
    if (!adaptive) {
      o.group.mode = quant::GroupMode::Fixed;
      o.group.group = -1;
    }
    o.keep = quant::default_keep_patterns();
    quant::convert_checkpoint(o);
    auto backend = make_cpu_backend();
    auto model = load_model(o.out, *backend);
    for (size_t i = 0; i < golden["prompts"].size(); ++i) {
      const ckpt::TensorView t = gold_logits.get("logits." + std::to_string(i));
      std::vector<float> ref(static_cast<size_t>(t.numel()));
      std::memcpy(ref.data(), t.data, t.nbytes());
      err[adaptive] += rel_fro_error(prefill_logits(*model, golden["prompts"][i]["ids"].get<std::vector<int32_t>>()), ref);
    }
  }
  std::printf("opt-outliers int4 summed logit error: column-wise %.3f, adaptive %.3f\n", err[0], err[1]);
  // Only 1 of the 12 matrices has outliers, so the others' int4 noise dominates the logits: the
  // measured gain is ~15% (1.54 -> 1.32).
  EXPECT_LT(err[1], 0.9 * err[0]);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, OptQuantized, ::testing::Values("opt-preln", "opt-postln-proj", "opt-outliers"));

}  // namespace
}  // namespace fineserve
