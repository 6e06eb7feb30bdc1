#include "engine/sampler.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "kernels/base.h"

namespace fineserve {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// NaN -> -inf (never chosen), +inf -> the largest float (so max - x stays finite or -inf).
float sanitize(float x) {
  if (std::isnan(x)) return -kInf;
  if (x == kInf) return std::numeric_limits<float>::max();
  return x;
}

// The first sorted prefix the top-p search tries before widening it (x4 each time).
constexpr int kFirstNucleusGuess = 256;

// Tokens per block of the weight sums (see exp_weights).
constexpr size_t kBlock = 256;

// Branch-free float select, c ? a : b, on the bit patterns. GCC (with the default
// -ftrapping-math) will not if-convert a ?: whose arms it has folded differently, so the loops
// over the vocabulary would not vectorise with a plain ?: (checked with -fopt-info-vec).
inline float bit_select(bool c, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & mask) | (std::bit_cast<uint32_t>(b) & ~mask));
}

}  // namespace

namespace detail {

// exp(x) for x <= 0 (or -inf); exactly 1 at 0 and exactly 0 below -87 (where float exp
// underflows anyway). Cephes' expf — range reduction to 2^n * exp(r) with |r| <= ln2/2, then a
// degree-6 polynomial; within 2e-7 relative of exp — written as plain float arithmetic because
// GCC vectorises the loops over the vocabulary that call it, which it cannot do with std::exp
// (a libm call) without -ffast-math, and because its results do not depend on the platform libm.
float exp_nonpositive(float x) {
  // n = round(x * log2(e)): adding 1.5 * 2^23 rounds to an integer and leaves it in the low
  // mantissa bits of t; this vectorises with plain SSE2, where std::round / int casts need more.
  const float magic = 12582912.0f;
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  // r = x - n ln2, with ln2 split in two (Cody-Waite) so that r keeps its low bits.
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n built in the float's exponent field. Unsigned arithmetic: for x < -87 (or -inf) the bits
  // are garbage, but defined, and bit_select below discards them.
  const uint32_t n_bits = std::bit_cast<uint32_t>(t) - std::bit_cast<uint32_t>(magic);
  const float two_n = std::bit_cast<float>((n_bits + 127u) << 23);
  return bit_select(x >= -87.0f, p * two_n, 0.0f);
}

}  // namespace detail

namespace {

using detail::exp_nonpositive;

// (l - max) / T computed as (l - max) * (1 / T), with 0 kept exactly 0 so that a tiny T whose
// reciprocal overflows to inf still gives the best token weight 1 instead of NaN.
inline float scaled_logit(float l, float max_logit, float inv_t) {
  const float d = l - max_logit;
  return bit_select(d != 0.0f, d * inv_t, 0.0f);
}

// Sum of w[0, count) in a fixed order with 8 independent partial sums: one running double sum
// would wait on the add latency at every element; fixed order keeps the result reproducible.
double block_sum(const float* w, size_t count) {
  double lane[8] = {};
  size_t i = 0;
  for (; i + 8 <= count; i += 8)
    for (size_t j = 0; j < 8; ++j) lane[j] += w[i + j];
  for (; i < count; ++i) lane[0] += w[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// w[i] = exp((l[i] - max) / T) for the whole vocabulary; returns their sum, taken per block of
// kBlock weights and then over the blocks. The block sums (when asked for) let the sampler find a
// drawn token without a serial pass over the whole vocabulary.
double exp_weights(const float* l, size_t n, float max_logit, float inv_t, float* w,
                   std::vector<double>* block_sums) {
  for (size_t i = 0; i < n; ++i) w[i] = exp_nonpositive(scaled_logit(l[i], max_logit, inv_t));
  const size_t n_blocks = (n + kBlock - 1) / kBlock;
  if (block_sums) block_sums->resize(n_blocks);
  double z = 0.0;
  for (size_t b = 0; b < n_blocks; ++b) {
    const double s = block_sum(w + b * kBlock, std::min(kBlock, n - b * kBlock));
    if (block_sums) (*block_sums)[b] = s;
    z += s;
  }
  return z;
}

}  // namespace

void SamplingParams::validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature))
    throw Error("sampling: temperature must be a finite number >= 0, got " + std::to_string(temperature));
  if (top_k < 0) throw Error("sampling: top_k must be >= 0 (0 = off), got " + std::to_string(top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f))
    throw Error("sampling: top_p must be in (0, 1], got " + std::to_string(top_p));
  if (!(repetition_penalty > 0.0f) || !std::isfinite(repetition_penalty))
    throw Error("sampling: repetition_penalty must be a finite number > 0, got " +
                std::to_string(repetition_penalty));
  if (!(presence_penalty >= -2.0f && presence_penalty <= 2.0f))
    throw Error("sampling: presence_penalty must be in [-2, 2], got " + std::to_string(presence_penalty));
  if (!(frequency_penalty >= -2.0f && frequency_penalty <= 2.0f))
    throw Error("sampling: frequency_penalty must be in [-2, 2], got " + std::to_string(frequency_penalty));
  for (const auto& [id, bias] : logit_bias) {
    if (id < 0) throw Error("sampling: logit_bias has a negative token id " + std::to_string(id));
    if (!(bias >= -100.0f && bias <= 100.0f))
      throw Error("sampling: logit_bias values must be in [-100, 100], got " + std::to_string(bias));
  }
  if (min_tokens < 0) throw Error("sampling: min_tokens must be >= 0, got " + std::to_string(min_tokens));
}

// ---- logits processors --------------------------------------------------------------------------

namespace {

// CTRL's repetition penalty (HF RepetitionPenaltyLogitsProcessor) over prompt + output. Each
// distinct id is penalised once, however often it occurs.
class RepetitionPenalty final : public LogitsProcessor {
 public:
  explicit RepetitionPenalty(float penalty) : penalty_(penalty) {}
  void apply(std::span<float> logits, const SequenceTokens& seq) override {
    seen_.assign(logits.size(), 0);
    for (std::span<const int32_t> part : {seq.prompt, seq.output})
      for (int32_t t : part) {
        FS_ASSERT(t >= 0 && static_cast<size_t>(t) < logits.size(), "token id outside the vocabulary");
        if (seen_[static_cast<size_t>(t)]) continue;
        seen_[static_cast<size_t>(t)] = 1;
        float& x = logits[static_cast<size_t>(t)];
        x = x > 0.0f ? x / penalty_ : x * penalty_;
      }
  }

 private:
  float penalty_;
  std::vector<uint8_t> seen_;
};

// OpenAI's presence and frequency penalties over the generated tokens.
class OccurrencePenalties final : public LogitsProcessor {
 public:
  OccurrencePenalties(float presence, float frequency) : presence_(presence), frequency_(frequency) {}
  void apply(std::span<float> logits, const SequenceTokens& seq) override {
    counts_.assign(logits.size(), 0);
    for (int32_t t : seq.output) {
      FS_ASSERT(t >= 0 && static_cast<size_t>(t) < logits.size(), "token id outside the vocabulary");
      ++counts_[static_cast<size_t>(t)];
    }
    for (int32_t t : seq.output) {
      uint32_t& c = counts_[static_cast<size_t>(t)];
      if (c == 0) continue;  // done already
      logits[static_cast<size_t>(t)] -= static_cast<float>(c) * frequency_ + presence_;
      c = 0;
    }
  }

 private:
  float presence_, frequency_;
  std::vector<uint32_t> counts_;
};

class LogitBias final : public LogitsProcessor {
 public:
  explicit LogitBias(std::vector<std::pair<int32_t, float>> bias) : bias_(std::move(bias)) {}
  void apply(std::span<float> logits, const SequenceTokens&) override {
    for (const auto& [id, b] : bias_) {
      FS_ASSERT(static_cast<size_t>(id) < logits.size(), "logit_bias token id outside the vocabulary");
      logits[static_cast<size_t>(id)] += b;
    }
  }

 private:
  std::vector<std::pair<int32_t, float>> bias_;
};

// Forbids the stop tokens until min_tokens were generated (vLLM's min_tokens).
class MinTokens final : public LogitsProcessor {
 public:
  MinTokens(int min_tokens, std::span<const int32_t> stop_ids) : min_(min_tokens), ids_(stop_ids.begin(), stop_ids.end()) {}
  void apply(std::span<float> logits, const SequenceTokens& seq) override {
    if (seq.output.size() >= static_cast<size_t>(min_)) return;
    for (int32_t id : ids_)
      if (id >= 0 && static_cast<size_t>(id) < logits.size()) logits[static_cast<size_t>(id)] = -kInf;
  }

 private:
  int min_;
  std::vector<int32_t> ids_;
};

}  // namespace

PositionLogprobs logprobs_of(const float* logits, int vocab, int32_t token, int top) {
  FS_ASSERT(vocab >= 1 && token >= 0 && token < vocab && top >= 0);
  const size_t n = static_cast<size_t>(vocab);
  float max_logit = -kInf;
  for (size_t i = 0; i < n; ++i) max_logit = std::max(max_logit, sanitize(logits[i]));
  if (max_logit == -kInf) max_logit = 0.0f;
  double z = 0.0;
  for (size_t i = 0; i < n; ++i) z += static_cast<double>(detail::exp_nonpositive(sanitize(logits[i]) - max_logit));
  const double log_z = std::log(z) + static_cast<double>(max_logit);
  const auto lp = [&](size_t i) {
    const float x = sanitize(logits[i]);
    return x == -kInf ? -kInf : static_cast<float>(std::min(0.0, static_cast<double>(x) - log_z));
  };
  PositionLogprobs out;
  out.token = token;
  out.logprob = lp(static_cast<size_t>(token));
  if (top > 0) {
    // The `top` best (logit desc, then id asc), kept sorted: top is small (<= 20 from the API).
    const size_t k = std::min(static_cast<size_t>(top), n);
    std::vector<int32_t> best;
    best.reserve(k + 1);
    const auto better = [&](int32_t a, int32_t b) {
      const float la = sanitize(logits[a]), lb = sanitize(logits[b]);
      return la > lb || (la == lb && a < b);
    };
    for (int32_t i = 0; i < static_cast<int32_t>(n); ++i) {
      if (best.size() == k && !better(i, best.back())) continue;
      best.insert(std::upper_bound(best.begin(), best.end(), i, better), i);
      if (best.size() > k) best.pop_back();
    }
    for (int32_t id : best) out.top.push_back({id, lp(static_cast<size_t>(id))});
  }
  return out;
}

uint64_t splitmix64_next(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

Xoshiro256StarStar::Xoshiro256StarStar(uint64_t seed) {
  uint64_t sm = seed;
  for (uint64_t& word : s_) word = splitmix64_next(sm);
}

Xoshiro256StarStar::Xoshiro256StarStar(const std::array<uint64_t, 4>& state) : s_(state) {
  FS_ASSERT((s_[0] | s_[1] | s_[2] | s_[3]) != 0, "xoshiro256** state must not be all zero");
}

uint64_t Xoshiro256StarStar::next() {
  const auto rotl = [](uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

Sampler::Sampler(const SamplingParams& params, std::span<const int32_t> stop_token_ids)
    : params_(params), rng_(params.seed) {
  params_.validate();
  if (params_.repetition_penalty != 1.0f) processors_.push_back(std::make_unique<RepetitionPenalty>(params_.repetition_penalty));
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f)
    processors_.push_back(std::make_unique<OccurrencePenalties>(params_.presence_penalty, params_.frequency_penalty));
  if (!params_.logit_bias.empty()) processors_.push_back(std::make_unique<LogitBias>(params_.logit_bias));
  if (params_.min_tokens > 0 && !stop_token_ids.empty())
    processors_.push_back(std::make_unique<MinTokens>(params_.min_tokens, stop_token_ids));
}

Sampler::~Sampler() = default;
Sampler::Sampler(Sampler&&) noexcept = default;
Sampler& Sampler::operator=(Sampler&&) noexcept = default;

void Sampler::add_processor(std::unique_ptr<LogitsProcessor> processor) { processors_.push_back(std::move(processor)); }

void Sampler::select_top(int m) {
  const size_t n = logits_.size();
  const float* l = logits_.data();
  // A total order (logit desc, then id asc): the selected set and its order are then the same
  // with every standard library, whatever its heap / nth_element / sort do with ties.
  const auto better = [l](int32_t a, int32_t b) {
    const float la = l[a], lb = l[b];
    return la > lb || (la == lb && a < b);
  };
  if (static_cast<size_t>(m) <= n / 8) {
    // One pass with a heap of the m best so far, worst on top: most ids fail the single
    // comparison with the top, so this is about n compares (nth_element moves every id around).
    order_.clear();
    for (int32_t i = 0; i < static_cast<int32_t>(n); ++i) {
      if (order_.size() < static_cast<size_t>(m)) {
        order_.push_back(i);
        std::push_heap(order_.begin(), order_.end(), better);
      } else if (better(i, order_.front())) {
        std::pop_heap(order_.begin(), order_.end(), better);
        order_.back() = i;
        std::push_heap(order_.begin(), order_.end(), better);
      }
    }
    std::sort_heap(order_.begin(), order_.end(), better);
  } else {
    order_.resize(n);
    std::iota(order_.begin(), order_.end(), 0);
    if (static_cast<size_t>(m) < n)
      std::nth_element(order_.begin(), order_.begin() + m, order_.end(), better);
    std::sort(order_.begin(), order_.begin() + m, better);
    order_.resize(static_cast<size_t>(m));
  }
}

SampledToken Sampler::sample(const float* logits, int vocab, const SequenceTokens& seq) {
  FS_ASSERT(logits != nullptr && vocab >= 1);
  const size_t n = static_cast<size_t>(vocab);
  logits_.resize(n);
  float* l = logits_.data();
  for (size_t i = 0; i < n; ++i) l[i] = sanitize(logits[i]);

  // 1. The logits processors (penalties, bias, min_tokens, added ones), then sanitise again: a
  //    penalty or bias may push a logit past the float range.
  if (!processors_.empty()) {
    for (auto& p : processors_) p->apply(std::span<float>(l, n), seq);
    for (size_t i = 0; i < n; ++i) l[i] = sanitize(l[i]);
  }

  // The maximum (for a stable softmax) and the first id holding it (greedy ties -> lowest id).
  // (8 running maxima: they break the dependency chain of a single one; GCC does not vectorise a
  // float max reduction without -ffast-math.)
  float lane_max[8];
  std::fill(lane_max, lane_max + 8, -kInf);
  size_t i8 = 0;
  for (; i8 + 8 <= n; i8 += 8)
    for (size_t j = 0; j < 8; ++j) lane_max[j] = l[i8 + j] > lane_max[j] ? l[i8 + j] : lane_max[j];
  for (; i8 < n; ++i8) lane_max[0] = l[i8] > lane_max[0] ? l[i8] : lane_max[0];
  float max_logit = *std::max_element(lane_max, lane_max + 8);
  if (max_logit == -kInf) {  // nothing is possible: treat every token as equally likely
    std::fill(logits_.begin(), logits_.end(), 0.0f);
    max_logit = 0.0f;
  }
  const auto best = static_cast<int32_t>(std::find(l, l + n, max_logit) - l);

  weights_.resize(n);
  // 2. Greedy. The reported logprob is log_softmax of the penalised logits (temperature 1).
  if (!params_.do_sample || params_.temperature == 0.0f) {
    const double z = exp_weights(l, n, max_logit, 1.0f, weights_.data(), nullptr);
    return {best, static_cast<float>(-std::log(z))};
  }

  // 3. Temperature: softmax(l / T) is proportional to exp((l - max) / T).
  const float inv_t = 1.0f / params_.temperature;
  const auto logprob_of = [&](int32_t i, double z_kept) {
    const double lp = static_cast<double>(scaled_logit(l[i], max_logit, inv_t)) - std::log(z_kept);
    return static_cast<float>(std::min(lp, 0.0));
  };
  const int k = params_.top_k > 0 ? std::min(params_.top_k, vocab) : vocab;
  const bool use_top_p = params_.top_p < 1.0f;

  if (k == vocab && !use_top_p) {
    // No filtering: draw over the whole vocabulary in id order, without sorting. Find the block
    // the draw falls in from the block sums, then the token inside it.
    const double z = exp_weights(l, n, max_logit, inv_t, weights_.data(), &block_sums_);
    const double u = rng_.next_double() * z;
    double cum = 0.0;
    size_t b = 0;
    for (; b + 1 < block_sums_.size() && cum + block_sums_[b] <= u; ++b) cum += block_sums_[b];
    int32_t chosen = best;  // fallback against rounding
    for (size_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) {
      cum += weights_[i];
      if (weights_[i] > 0.0f) chosen = static_cast<int32_t>(i);
      if (cum > u) break;
    }
    return {chosen, logprob_of(chosen, z)};
  }

  // Candidates best first in order_, their weights in cand_weights_.
  const auto weigh_candidates = [&] {
    cand_weights_.resize(order_.size());
    for (size_t i = 0; i < order_.size(); ++i)
      cand_weights_[i] = exp_nonpositive(scaled_logit(l[order_[i]], max_logit, inv_t));
  };
  int n_keep = k;
  if (!use_top_p) {
    select_top(k);  // top-k only
    weigh_candidates();
  } else {
    // Top-p renormalises over what top-k left: the whole vocabulary or the k best. Only a prefix
    // of the candidates is sorted, widened while the nucleus does not fit in it: a nucleus is
    // usually a few hundred tokens out of 50k-128k.
    double z_ref = 0.0;
    int m = k;
    if (k == vocab) {
      z_ref = exp_weights(l, n, max_logit, inv_t, weights_.data(), nullptr);
      m = std::min(k, kFirstNucleusGuess);
    } else {
      select_top(k);
      weigh_candidates();
      for (double w : cand_weights_) z_ref += w;
    }
    // Keep the smallest prefix whose mass reaches top_p: token i stays while the mass strictly
    // before it is < top_p (HF TopPLogitsWarper, vLLM). Token 0 always stays.
    const double threshold = static_cast<double>(params_.top_p) * z_ref;
    for (;;) {
      if (k == vocab) {
        select_top(m);
        weigh_candidates();
      }
      double cum = 0.0;
      int i = 0;
      while (i < m && cum < threshold) cum += cand_weights_[static_cast<size_t>(i++)];
      if (cum >= threshold || m == k) {
        n_keep = std::max(i, 1);
        break;
      }
      m = static_cast<int>(std::min<int64_t>(static_cast<int64_t>(m) * 4, k));  // the nucleus is wider
    }
  }

  // 4. Draw among the n_keep best, renormalised.
  double z_kept = 0.0;
  for (int i = 0; i < n_keep; ++i) z_kept += cand_weights_[static_cast<size_t>(i)];
  const double u = rng_.next_double() * z_kept;
  double cum = 0.0;
  int32_t chosen = order_[0];
  for (int i = 0; i < n_keep; ++i) {
    const double w = cand_weights_[static_cast<size_t>(i)];
    cum += w;
    if (w > 0.0) chosen = order_[static_cast<size_t>(i)];  // the last positive: fallback for rounding
    if (cum > u) break;
  }
  return {chosen, logprob_of(chosen, z_kept)};
}

}  // namespace fineserve
