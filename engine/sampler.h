// Token sampling from one row of logits, per request (the logits processors of HF / vLLM).
//
// Order:
//   1. the logits processors, in this order: repetition penalty (CTRL rule, HF / vLLM) on every
//      token id seen in prompt + output; presence and frequency penalties (OpenAI's definition) on
//      the output's tokens; logit_bias; while fewer than min_tokens were generated, the stop token
//      ids forbidden; then any processor added with add_processor (a grammar's allowed-token mask),
//   2. greedy argmax when !do_sample or temperature == 0 (ties -> the lowest id),
//   3. otherwise temperature, then top-k, then top-p (nucleus), then one random draw.
//
// The log-probabilities a client sees (logprobs_of) are of the model's raw distribution, before
// any of this, as vLLM reports them by default; SampledToken::logprob is of the processed one.
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
#include <memory>
#include <span>
#include <utility>
#include <vector>

namespace fineserve {

struct SamplingParams {
  float temperature = 1.0f;         // >= 0; 0 means greedy
  int top_k = 0;                    // keep the k most likely tokens; 0 = off
  float top_p = 1.0f;               // nucleus mass in (0, 1]; 1 = off
  float repetition_penalty = 1.0f;  // > 0; 1 = off (CTRL: > 1 discourages repeats)
  bool do_sample = false;           // false = greedy
  uint64_t seed = 0;                // the server picks a random one when the request gives none
  // OpenAI's penalties, in [-2, 2]; 0 = off. For a token generated c times so far:
  // logit -= c * frequency_penalty + (c > 0) * presence_penalty. Prompt tokens do not count.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  std::vector<std::pair<int32_t, float>> logit_bias;  // (token id >= 0, bias in [-100, 100]) added to the logit
  int min_tokens = 0;  // >= 0: the stop token ids (Sampler's constructor) are forbidden until this many were generated

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

// The tokens a sequence holds when its next token is chosen.
struct SequenceTokens {
  std::span<const int32_t> prompt;
  std::span<const int32_t> output;  // generated so far
};

// Edits one sequence's row of logits before the sampler chooses (vLLM / HF "logits processor").
// A token set to -inf cannot be drawn. The built-in ones come from SamplingParams; others (a
// grammar's allowed-token mask) are added with Sampler::add_processor.
class LogitsProcessor {
 public:
  virtual ~LogitsProcessor() = default;
  virtual void apply(std::span<float> logits, const SequenceTokens& seq) = 0;
};

// One token and its log-probability, for the API's logprobs fields.
struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};
// The log-probability of the token at one position and the `top` most likely alternatives there.
struct PositionLogprobs {
  int32_t token = 0;
  float logprob = 0.0f;
  std::vector<TokenLogprob> top;  // best first (ties -> lower id)
};
// log_softmax of the raw logits [vocab] at `token`, with the `top` >= 0 most likely tokens. NaN
// logits count as -inf.
PositionLogprobs logprobs_of(const float* logits, int vocab, int32_t token, int top);

namespace detail {
// exp(x) for x <= 0, 0 below -87, exactly 1 at 0; within 2e-7 relative of exp. Vectorisable and
// libm-independent (see sampler.cpp). Declared here for its test.
float exp_nonpositive(float x);
}  // namespace detail

// One per request; not thread-safe (use one per request, each on one thread at a time).
class Sampler {
 public:
  // Validates params (throws fineserve::Error). stop_token_ids: what min_tokens holds back.
  explicit Sampler(const SamplingParams& params, std::span<const int32_t> stop_token_ids = {});
  ~Sampler();
  Sampler(Sampler&&) noexcept;
  Sampler& operator=(Sampler&&) noexcept;

  // Runs `processor` after the built-in ones, on every later draw.
  void add_processor(std::unique_ptr<LogitsProcessor> processor);

  const SamplingParams& params() const { return params_; }

  // Picks the next token from logits [vocab] (vocab >= 1) of a sequence holding `seq`. Token ids
  // in seq and logit_bias must be in [0, vocab) (FS_ASSERT; the API checked them). Non-finite
  // logits are tolerated: NaN counts as -inf, +inf as the largest float; when no logit is above
  // -inf all tokens count as equally likely.
  SampledToken sample(const float* logits, int vocab, const SequenceTokens& seq);
  // previous_tokens as the prompt (repetition penalty only; repeats are penalised once).
  SampledToken sample(const float* logits, int vocab, std::span<const int32_t> previous_tokens) {
    return sample(logits, vocab, SequenceTokens{previous_tokens, {}});
  }

 private:
  // Puts the m best ids (logit desc, then id asc), sorted, in order_.
  void select_top(int m);

  SamplingParams params_;
  Xoshiro256StarStar rng_;
  std::vector<std::unique_ptr<LogitsProcessor>> processors_;
  // Scratch reused across calls so that a decode step does not allocate.
  std::vector<float> logits_;         // [vocab] processed logits
  std::vector<float> weights_;        // [vocab] exp((logit - max) / T)
  std::vector<double> block_sums_;    // sums of weights_ per block of ids
  std::vector<int32_t> order_;        // top-k / top-p candidate ids, best first
  std::vector<double> cand_weights_;  // their weights, in order_ order
};

}  // namespace fineserve
