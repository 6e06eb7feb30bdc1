// Token sampling from one row of logits, per request (the logits processors of HF / vLLM).
//
// Order, as HF transformers and vLLM apply it:
//   1. repetition penalty (CTRL rule) on every token id seen in prompt + output,
//   2. greedy argmax when !do_sample or temperature == 0 (ties -> the lowest id),
//   3. otherwise temperature, then top-k, then top-p (nucleus), then one random draw.
//
// Reproducibility: each Sampler owns its random generator, xoshiro256** seeded by splitmix64 of
// SamplingParams::seed. Both generators are specified bit for bit by their published reference
// code, and every draw is turned into a uniform double without std:: distributions (whose
// output is implementation-defined), so the same seed gives the same random stream on every
// platform and compiler. Candidates are ordered by a total order (logit desc, then id asc), so
// the top-k / top-p sets do not depend on the standard library, and the softmax weights use the
// sampler's own exp (plain float arithmetic, fixed summation order) rather than libm's. The same
// seed and logits therefore give the same tokens wherever float arithmetic is IEEE and not
// contracted into FMAs (the default for GCC in ISO C++ mode).
//
// Cost for a 128k vocabulary: a few passes over the logits (copy, max, exp) plus, with top-k, one
// pass keeping a k-element heap; top-p sorts only a prefix of candidates (256, widened x4 as
// needed). No full sort of the vocabulary unless the nucleus is that wide.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

namespace fineserve {

struct SamplingParams {
  float temperature = 1.0f;         // >= 0; 0 means greedy
  int top_k = 0;                    // keep the k most likely tokens; 0 = off
  float top_p = 1.0f;               // nucleus mass in (0, 1]; 1 = off
  float repetition_penalty = 1.0f;  // > 0; 1 = off (CTRL: > 1 discourages repeats)
  bool do_sample = false;           // false = greedy
  uint64_t seed = 0;                // the server picks a random one when the request gives none

  // Throws fineserve::Error naming the field when a value is out of range (or NaN / infinite).
  void validate() const;
};

// splitmix64 (Steele, Lea, Flood 2014; reference code prng.di.unimi.it/splitmix64.c): advances
// `state` by the golden-ratio increment and returns the mixed value. Used to expand a seed.
uint64_t splitmix64_next(uint64_t& state);

// xoshiro256** 1.0 (Blackman & Vigna 2018; reference code prng.di.unimi.it/xoshiro256starstar.c).
class Xoshiro256StarStar {
 public:
  // State words s[0..3] = four successive splitmix64 outputs starting from `seed`, as the
  // authors recommend (a splitmix64 stream is never all zero over four outputs).
  explicit Xoshiro256StarStar(uint64_t seed);
  // An explicit state (must not be all zero); for testing against published vectors.
  explicit Xoshiro256StarStar(const std::array<uint64_t, 4>& state);

  uint64_t next();
  // Uniform in [0, 1): the top 53 bits of next() times 2^-53.
  double next_double() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  std::array<uint64_t, 4> s_;
};

// The outcome of one draw.
struct SampledToken {
  int32_t token = 0;
  // Log-probability of `token` under the distribution it was drawn from: log_softmax of the
  // processed logits (after penalty, temperature, and renormalised over the top-k / top-p set).
  // For greedy decoding: log_softmax of the penalised logits at temperature 1 over the whole
  // vocabulary. Always <= 0 and finite.
  float logprob = 0.0f;
};

namespace detail {
// exp(x) for x <= 0, 0 below -87, exactly 1 at 0; within 2e-7 relative of exp. Vectorisable and
// libm-independent (see sampler.cpp). Declared here for its test.
float exp_nonpositive(float x);
}  // namespace detail

// One per request; not thread-safe (use one per request, each on one thread at a time).
class Sampler {
 public:
  // Validates params (throws fineserve::Error).
  explicit Sampler(const SamplingParams& params);

  const SamplingParams& params() const { return params_; }

  // Picks the next token from logits [vocab] (vocab >= 1). previous_tokens: every token id of
  // the prompt and of the output so far, in any order and with repeats (each distinct id is
  // penalised once); ids outside [0, vocab) throw fineserve::Error.
  // Non-finite logits are tolerated: NaN counts as -inf, +inf as the largest float; when no
  // logit is above -inf all tokens count as equally likely.
  SampledToken sample(const float* logits, int vocab, std::span<const int32_t> previous_tokens);

 private:
  // Puts the m best ids (logit desc, then id asc), sorted, in order_.
  void select_top(int m);

  SamplingParams params_;
  Xoshiro256StarStar rng_;
  // Scratch reused across calls so that a decode step does not allocate.
  std::vector<float> logits_;         // [vocab] processed logits
  std::vector<float> weights_;        // [vocab] exp((logit - max) / T)
  std::vector<double> block_sums_;    // sums of weights_ per block of ids
  std::vector<int32_t> order_;        // top-k / top-p candidate ids, best first
  std::vector<double> cand_weights_;  // their weights, in order_ order
};

}  // namespace fineserve
