// Helpers shared by the golden-logit tests of tests/models/.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "models/model.h"

namespace fineserve::testing {

// Logits of every prompt position in one prefill step.
inline std::vector<float> prefill_logits(Model& model, const std::vector<int32_t>& ids) {
  model.allocate_kv_cache(64, 16);
  StepInput s;
  s.token_ids = ids;
  for (size_t i = 0; i < ids.size(); ++i) {
    s.positions.push_back(static_cast<int32_t>(i));
    s.logit_rows.push_back(static_cast<int32_t>(i));
  }
  s.query_start = {0, static_cast<int32_t>(ids.size())};
  s.context_len = {static_cast<int32_t>(ids.size())};
  s.max_blocks = static_cast<int>((ids.size() + 15) / 16);
  for (int b = 0; b < s.max_blocks; ++b) s.block_table.push_back(b);
  std::vector<float> out(ids.size() * static_cast<size_t>(model.info().vocab_size), NAN);
  model.forward(s, out.data());
  return out;
}

// max |a - b| / max |b|: the error relative to the logits' scale.
inline double rel_max_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return num / den;
}

}  // namespace fineserve::testing
