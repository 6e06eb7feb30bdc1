// Perplexity of a model over a token sequence, with a sliding window (as in Hugging Face's
// "Perplexity of fixed-length models" guide):
//
//   windows [begin, begin + ctx) with begin = 0, stride, 2 * stride, ... until one reaches the end;
//   each window scores the tokens no earlier window scored, each with the window's preceding tokens
//   as context; a window's first token has none, so it is never scored (the text's first token, and
//   with stride == ctx the first of every window).
//   ppl = exp(sum of -log p(token | context) / tokens scored)
//
// With a reference model (perplexity_vs_reference), both models read the same windows and, for
// every scored token, the KL divergence KL(P_ref || P) = sum_v P_ref(v) (log P_ref(v) - log P(v)) of
// the next-token distributions is summed, as llama.cpp's perplexity tool does with --kl-divergence:
// more sensitive than perplexity, since it sees the whole distribution and not only the true token.
//
// stride == ctx gives disjoint windows (fast, less context per token); a smaller stride gives every
// scored token at least ctx - stride tokens of context, at the price of recomputing the overlap.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "models/model.h"

namespace fineserve {

struct PerplexityOptions {
  int ctx = 1024;     // window length in tokens (at most the model's max_context)
  int stride = 512;   // how far each window starts after the previous one, in [1, ctx]
  int chunk = 256;    // tokens per forward step (bounds the logits held at once)
  int block_size = 16;
};

struct PerplexityResult {
  double nll_sum = 0;       // natural log
  int64_t tokens = 0;       // tokens scored
  int windows = 0;
  double ppl() const { return tokens ? std::exp(nll_sum / static_cast<double>(tokens)) : NAN; }
  double bits_per_token() const { return tokens ? nll_sum / static_cast<double>(tokens) / std::log(2.0) : NAN; }
  // perplexity_vs_reference only (0 otherwise):
  double ref_nll_sum = 0;  // the reference model's nll over the same tokens
  double kl_sum = 0;       // sum over scored tokens of KL(P_ref || P), natural log
  double kl_max = 0;       // the largest per-token KL
  int64_t same_top = 0;    // tokens where both models' most likely next token agree
  double mean_kl() const { return tokens ? kl_sum / static_cast<double>(tokens) : NAN; }
  double ref_ppl() const { return tokens ? std::exp(ref_nll_sum / static_cast<double>(tokens)) : NAN; }
  double same_top_fraction() const { return tokens ? static_cast<double>(same_top) / static_cast<double>(tokens) : NAN; }
};

// Throws fineserve::Error for options out of range or fewer than 2 tokens. `progress` is called after
// each window with (tokens scored so far, tokens to score).
PerplexityResult perplexity(Model& model, const std::vector<int32_t>& ids, const PerplexityOptions& options,
                            const std::function<void(int64_t done, int64_t total)>& progress = {});

// The same over `model`, plus the KL divergence against `reference` (same vocabulary; both get a
// KV cache of ctx tokens). Throws fineserve::Error when the vocabularies differ.
PerplexityResult perplexity_vs_reference(Model& model, Model& reference, const std::vector<int32_t>& ids,
                                         const PerplexityOptions& options,
                                         const std::function<void(int64_t done, int64_t total)>& progress = {});

}  // namespace fineserve
