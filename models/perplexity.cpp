#include "models/perplexity.h"

#include <algorithm>
#include <string>

#include "kernels/base.h"

namespace fineserve {

namespace {

// log_softmax(row)[k] = row[k] - lse, lse = logsumexp(row), in double.
double logsumexp(const float* row, int64_t vocab) {
  const double mx = *std::max_element(row, row + vocab);
  double sum = 0;
  for (int64_t k = 0; k < vocab; ++k) sum += std::exp(static_cast<double>(row[k]) - mx);
  return mx + std::log(sum);
}

PerplexityResult run(Model& model, Model* reference, const std::vector<int32_t>& ids, const PerplexityOptions& o,
                     const std::function<void(int64_t, int64_t)>& progress) {
  const auto n = static_cast<int64_t>(ids.size());
  const int64_t vocab = model.info().vocab_size;
  if (n < 2) throw Error("perplexity needs at least 2 tokens of text, got " + std::to_string(n));
  if (o.ctx < 2) throw Error("the perplexity window (--ctx) must be at least 2 tokens, got " + std::to_string(o.ctx));
  if (o.ctx > model.info().max_context)
    throw Error("the perplexity window (--ctx " + std::to_string(o.ctx) + ") exceeds the model's context of " +
                std::to_string(model.info().max_context) + " tokens");
  if (o.stride < 1 || o.stride > o.ctx)
    throw Error("the perplexity stride (--stride) must be in [1, ctx = " + std::to_string(o.ctx) + "], got " +
                std::to_string(o.stride));
  FS_ASSERT(o.chunk > 0 && o.block_size > 0);
  for (const int32_t id : ids)
    if (id < 0 || id >= vocab)
      throw Error("token id " + std::to_string(id) + " is outside the model's vocabulary of " + std::to_string(vocab));

  if (reference && reference->info().vocab_size != vocab)
    throw Error("the reference model's vocabulary (" + std::to_string(reference->info().vocab_size) +
                ") differs from the model's (" + std::to_string(vocab) + ")");

  const int blocks = (o.ctx + o.block_size - 1) / o.block_size;
  model.allocate_kv_cache(blocks, o.block_size);
  if (reference) reference->allocate_kv_cache(blocks, o.block_size);
  // Tokens to score: all but the first, less the first token of any window that starts past the
  // scored ones (it has no context inside its window): stride == ctx leaves one per window.
  int64_t total = 0;
  for (int64_t begin = 0, scored_end = 1;; begin += o.stride) {
    const int64_t end = std::min(begin + o.ctx, n);
    total += end - std::max(scored_end, begin + 1);
    scored_end = end;
    if (end == n) break;
  }

  PerplexityResult r;
  std::vector<float> logits, ref_logits;
  int64_t scored_end = 1;  // tokens [1, scored_end) are scored (token 0 has no context)
  for (int64_t begin = 0;; begin += o.stride) {
    const int64_t end = std::min(begin + o.ctx, n);
    const int64_t first_target = std::max(scored_end, begin + 1);
    // One sequence per window, fed in chunks; the logit row of token t predicts token t + 1.
    for (int64_t c0 = begin; c0 < end; c0 += o.chunk) {
      const int64_t c1 = std::min(c0 + o.chunk, end);
      StepInput s;
      s.token_ids.assign(ids.begin() + c0, ids.begin() + c1);
      for (int64_t t = c0; t < c1; ++t) {
        s.positions.push_back(static_cast<int32_t>(t - begin));
        if (t + 1 >= first_target && t + 1 < end) s.logit_rows.push_back(static_cast<int32_t>(t - c0));
      }
      s.query_start = {0, static_cast<int32_t>(c1 - c0)};
      s.context_len = {static_cast<int32_t>(c1 - begin)};
      s.max_blocks = blocks;
      for (int b = 0; b < blocks; ++b) s.block_table.push_back(b);
      logits.resize(s.logit_rows.size() * static_cast<size_t>(vocab));
      model.forward(s, logits.data());
      if (reference) {
        ref_logits.resize(logits.size());
        reference->forward(s, ref_logits.data());
      }
      for (size_t i = 0; i < s.logit_rows.size(); ++i) {
        const float* row = logits.data() + i * static_cast<size_t>(vocab);
        const int32_t target = ids[static_cast<size_t>(c0 + s.logit_rows[i] + 1)];
        // -log softmax(row)[target] = logsumexp(row) - row[target], in double.
        const double lse = logsumexp(row, vocab);
        r.nll_sum += lse - static_cast<double>(row[target]);
        if (!reference) continue;
        const float* ref = ref_logits.data() + i * static_cast<size_t>(vocab);
        const double ref_lse = logsumexp(ref, vocab);
        r.ref_nll_sum += ref_lse - static_cast<double>(ref[target]);
        // KL(P_ref || P) = sum_k p_ref(k) * ((ref[k] - ref_lse) - (row[k] - lse)).
        double kl = 0;
        for (int64_t k = 0; k < vocab; ++k) {
          const double log_ref = static_cast<double>(ref[k]) - ref_lse;
          kl += std::exp(log_ref) * (log_ref - (static_cast<double>(row[k]) - lse));
        }
        kl = std::max(kl, 0.0);  // rounding can leave a tiny negative sum for identical rows
        r.kl_sum += kl;
        r.kl_max = std::max(r.kl_max, kl);
        r.same_top += std::max_element(row, row + vocab) - row == std::max_element(ref, ref + vocab) - ref;
      }
    }
    r.tokens += end - first_target;
    scored_end = end;
    ++r.windows;
    if (progress) progress(r.tokens, total);
    if (end == n) break;
  }
  return r;
}

}  // namespace

PerplexityResult perplexity(Model& model, const std::vector<int32_t>& ids, const PerplexityOptions& o,
                            const std::function<void(int64_t, int64_t)>& progress) {
  return run(model, nullptr, ids, o, progress);
}

PerplexityResult perplexity_vs_reference(Model& model, Model& reference, const std::vector<int32_t>& ids,
                                         const PerplexityOptions& o,
                                         const std::function<void(int64_t, int64_t)>& progress) {
  return run(model, &reference, ids, o, progress);
}

}  // namespace fineserve
