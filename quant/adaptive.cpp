#include "quant/adaptive.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>
#include <numbers>
#include <string>
#include <tuple>

#include "kernels/base.h"
#include "quant/row_kernels.h"

namespace fineserve::quant {

// Chosen by `fineserve bench alpha` (bench/alpha_sweep.cpp); see docs/quantization.md.
const double kDefaultAlpha = 1.1;
// Gaussian matrices measure within ~2 % of the reference at every K (sampling noise); planted outlier
// channels put a matrix at 1.5-3x of it at column-wise; SmolLM2-135M's matrices measure 1.03-1.3x.
// 1.1 keeps Gaussian ones coarse with a margin and refines the heavier-tailed. See docs/quantization.md.
const double kDefaultTolerance = 1.1;
// i.i.d. Gaussian weights at 4 bits measure 0.082 (g32), 0.091 (g64), 0.097 (g128) and 0.105-0.11
// column-wise (K = 576-4096) with the scale search, and 0.086 with llama.cpp Q4_0's layout (g32, signed absmax); at
// 8 bits below 0.01 at any group. A cap at Q4_0's Gaussian error keeps int4 at 32 unless a matrix
// is lighter-tailed than Gaussian, and leaves int8 free: on SmolLM2-135M int4 at 64 everywhere
// (what a cap of 0.093 gave) lost 13 % perplexity to g32 and fell behind Q4_0 (docs/quantization.md).
const double kDefaultErrorCap = 0.086;

namespace {

constexpr uint32_t kFloatInfBits = 0x7f800000u;

std::string num(double v, int precision = 2) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", precision, v);
  return buf;
}

// Sums one chunk of rows contributes to each candidate level.
struct LevelSums {
  double range_sum = 0;   // sum of group absmax
  uint32_t range_max = 0;  // max group absmax (bit pattern, see group_absmax_bits)
  double err_sq = 0;
  double norm_sq = 0;
};

// One pass over w in chunks of rows: the range statistics at every allowed group of K, and with
// bits > 0 also the quantization error at every one of them. Levels come back coarsest first.
std::vector<GroupLevel> scan_levels(const MatrixView& w, int bits, ScaleRule rule, const float* importance = nullptr) {
  detail::check_matrix(w);
  const std::vector<int64_t> groups = allowed_groups(w.cols);
  if (groups.empty()) throw Error("cannot choose a group size for a matrix with K=" + std::to_string(w.cols));
  const size_t n_levels = groups.size();
  const int64_t finest = groups.back();

  std::vector<std::vector<LevelSums>> chunk_sums(static_cast<size_t>(detail::chunk_count(w)),
                                                 std::vector<LevelSums>(n_levels));
  detail::for_each_row_chunk(w, [&](const detail::RowChunk& chunk) {
    std::vector<LevelSums>& sums = chunk_sums[static_cast<size_t>(chunk.index)];
    // absmax per group at every level; level i has cols / groups[i] entries.
    std::vector<std::vector<uint32_t>> absmax(n_levels);
    for (size_t l = 0; l < n_levels; ++l) absmax[l].resize(static_cast<size_t>(w.cols / groups[l]));
    detail::RowScratch scratch;
    std::vector<uint8_t> codes(bits > 0 ? static_cast<size_t>(w.cols) : 0);
    std::vector<uint16_t> scales(bits > 0 ? static_cast<size_t>(w.cols / finest) : 0);

    for (int64_t i = 0; i < chunk.rows; ++i) {
      const float* row = chunk.data + i * w.cols;
      // The finest level is measured; every coarser group is a union of the next finer level's
      // groups (all candidates are K or powers of two dividing K), so its absmax is their max.
      std::vector<uint32_t>& fine = absmax[n_levels - 1];
      detail::group_absmax_bits(row, w.cols, finest, fine.data());
      for (size_t g = 0; g < fine.size(); ++g) {
        if (fine[g] >= kFloatInfBits) {
          detail::throw_non_finite(row + static_cast<int64_t>(g) * finest, finest, chunk.row0 + i,
                                   static_cast<int64_t>(g) * finest);
        }
      }
      for (size_t l = n_levels - 1; l-- > 0;) {
        const size_t children = static_cast<size_t>(groups[l] / groups[l + 1]);
        for (size_t g = 0; g < absmax[l].size(); ++g) {
          const uint32_t* c = absmax[l + 1].data() + g * children;
          absmax[l][g] = *std::max_element(c, c + children);
        }
      }
      for (size_t l = 0; l < n_levels; ++l) {
        for (uint32_t a : absmax[l]) {
          sums[l].range_sum += std::bit_cast<float>(a);
          sums[l].range_max = std::max(sums[l].range_max, a);
        }
      }
      if (bits > 0) {
        for (size_t l = 0; l < n_levels; ++l) {
          const detail::RowSums e = detail::quantize_row_f32(row, w.cols, bits, groups[l], chunk.row0 + i,
                                                             codes.data(), scales.data(), scratch, rule,
                                                             importance);
          sums[l].err_sq += e.weighted_err_sq;  // = err_sq without importances
          sums[l].norm_sq += e.weighted_norm_sq;
        }
      }
    }
  });

  std::vector<GroupLevel> levels(n_levels);
  for (size_t l = 0; l < n_levels; ++l) {
    LevelSums total;
    for (const std::vector<LevelSums>& chunk : chunk_sums) {  // in chunk order: deterministic
      total.range_sum += chunk[l].range_sum;
      total.range_max = std::max(total.range_max, chunk[l].range_max);
      total.err_sq += chunk[l].err_sq;
      total.norm_sq += chunk[l].norm_sq;
    }
    GroupLevel& level = levels[l];
    level.group = groups[l];
    const double count = static_cast<double>(w.rows) * static_cast<double>(w.cols / groups[l]);
    level.mean_range = count > 0 ? total.range_sum / count : 0.0;
    level.max_range = std::bit_cast<float>(total.range_max);
    if (l > 0) {
      const double prev = levels[l - 1].mean_range;
      // A zero matrix has zero ranges at every level: call that "no change" (1), not 0/0.
      level.ratio = level.mean_range > 0 ? prev / level.mean_range : 1.0;
    }
    if (bits > 0) level.rel_error = total.norm_sq > 0 ? std::sqrt(total.err_sq / total.norm_sq) : 0.0;
  }
  return levels;
}

void check_bits(int bits) {
  if (!is_supported_bits(bits)) {
    throw Error("unsupported bit width " + std::to_string(bits) + " (supported: 8, 4, 3, 2)");
  }
}

// "K=4096" for the column-wise level, else the group size.
std::string level_name(int64_t group, int64_t k) {
  return group == k ? "K=" + std::to_string(k) : std::to_string(group);
}

GroupDecision choose_fixed(const MatrixView& w, const GroupOptions& options) {
  const int64_t k = w.cols;
  if (options.group == 0) throw Error("a fixed group size was asked for but none was given");
  const int64_t group = options.group == -1 ? k : options.group;
  if (!is_allowed_group(k, group)) {
    const std::string allowed = " (allowed: " + detail::allowed_groups_text(k) + ")";
    if (group <= 0 || k % group != 0) {
      throw Error("group " + std::to_string(group) + " does not divide K=" + std::to_string(k) + allowed);
    }
    throw Error("group " + std::to_string(group) + " is not allowed for K=" + std::to_string(k) +
                ": a group is K or a power of two >= 32 dividing K" + allowed);
  }
  GroupDecision d;
  d.mode = GroupMode::Fixed;
  d.group = group;
  d.reason = group == k ? "fixed: column-wise (K=" + std::to_string(k) + ")" : "fixed: group " + std::to_string(group);
  return d;
}

// splitmix64: a tiny, portable generator, so the Gaussian reference is the same on every platform.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

GroupDecision choose_gaussian(const MatrixView& w, const GroupOptions& options) {
  const double tolerance = options.tolerance == 0 ? kDefaultTolerance : options.tolerance;
  if (!std::isfinite(tolerance) || tolerance < 1) throw Error("the tolerance must be a number >= 1, got " + num(tolerance, 4));
  const double cap = options.error_cap == 0 ? kDefaultErrorCap : options.error_cap;
  if (!std::isfinite(cap) || cap <= 0 || cap >= 1) throw Error("the error cap must be in (0, 1), got " + num(cap, 4));
  const int64_t k = w.cols;
  GroupDecision d;
  d.mode = GroupMode::Adaptive;
  // Judged with absmax scales: one quantization pass per level, and a scale inflated by an outlier
  // shows fully (the search would partly clip it). The Gaussian reference uses the same rule.
  d.levels = scan_levels(w, options.bits, ScaleRule::Absmax);
  for (GroupLevel& l : d.levels) l.gaussian_rel_error = gaussian_rel_error(options.bits, l.group, ScaleRule::Absmax);
  const std::vector<GroupLevel>& levels = d.levels;
  // The cap: a group is a candidate only if Gaussian weights, quantized with the scale rule in use,
  // stay within it there (a property of the bits and the group, never of the data or of K beyond the
  // column-wise group's size; the reference is cached), or if the matrix itself already does with
  // plain absmax scales (an upper bound of the search's error; e.g. an all-zero matrix).
  auto under_cap = [&](const GroupLevel& l) {
    return gaussian_rel_error(options.bits, l.group, options.scale) <= cap || l.rel_error <= cap;
  };
  size_t first = 0;
  while (first + 1 < levels.size() && !under_cap(levels[first])) ++first;
  auto excess = [](const GroupLevel& l) { return l.gaussian_rel_error > 0 ? l.rel_error / l.gaussian_rel_error : 0.0; };
  size_t i = first;
  while (i + 1 < levels.size() && excess(levels[i]) > tolerance) ++i;
  d.group = levels[i].group;
  const std::string t = num(tolerance);
  const std::string capped =
      first == 0 ? ""
                 : "int" + std::to_string(options.bits) + " Gaussian error " +
                       num(gaussian_rel_error(options.bits, levels[first - 1].group, options.scale), 3) + " at " +
                       level_name(levels[first - 1].group, k) + " > cap " + num(cap, 3) + "; ";
  const std::string here = "error " + num(excess(levels[i]), 2) + "x Gaussian's at " + level_name(d.group, k);
  if (i == 0) {
    d.reason = here + " <= " + t + ": column-wise";
  } else if (excess(levels[i]) > tolerance) {
    d.reason = capped + "error > " + t + "x Gaussian's down to the finest allowed group (" +
               num(excess(levels[i]), 2) + "x at " + std::to_string(d.group) + ")";
  } else if (i == first) {
    d.reason = capped + here + " <= " + t + ": group " + std::to_string(d.group);
  } else {
    d.reason = capped + num(excess(levels[i - 1]), 2) + "x Gaussian's at " + level_name(levels[i - 1].group, k) +
               " > " + t + "; " + here;
  }
  return d;
}

GroupDecision choose_alpha(const MatrixView& w, const GroupOptions& options) {
  const double alpha = options.alpha == 0 ? kDefaultAlpha : options.alpha;
  if (!std::isfinite(alpha) || alpha <= 0) throw Error("alpha must be a positive number, got " + num(alpha, 4));
  const int64_t k = w.cols;

  GroupDecision d;
  d.mode = GroupMode::Alpha;
  d.levels = range_levels(w);
  const std::vector<GroupLevel>& levels = d.levels;
  if (levels.size() == 1) {
    d.group = k;
    d.reason = "K=" + std::to_string(k) + " allows no smaller group: column-wise";
    return d;
  }
  // Step to the next candidate while halving shrinks the mean range by more than α.
  size_t i = 0;
  while (i + 1 < levels.size() && levels[i + 1].ratio > alpha) ++i;
  d.group = levels[i].group;

  auto step = [&](size_t to) {
    return "R(" + level_name(levels[to - 1].group, k) + ")/R(" + level_name(levels[to].group, k) +
           ") = " + num(levels[to].ratio, 3);
  };
  std::string taken;
  for (size_t s = 1; s <= i; ++s) taken += (s > 1 ? ", " : "") + step(s);
  const std::string a = num(alpha);
  if (i == 0) {
    d.reason = step(1) + " <= α = " + a + ": column-wise";
  } else if (i + 1 == levels.size()) {
    d.reason = taken + " > α = " + a + ": stopped at the finest allowed group " + std::to_string(d.group);
  } else {
    d.reason = taken + " > α = " + a + "; " + step(i + 1) + " <= α: group " + std::to_string(d.group);
  }
  return d;
}

GroupDecision choose_max_rel_error(const MatrixView& w, const GroupOptions& options) {
  const double target = options.max_rel_error;
  if (!std::isfinite(target) || target <= 0) {
    throw Error("the relative error target must be a positive number, got " + num(target, 6));
  }
  GroupDecision d;
  d.mode = GroupMode::MaxRelError;
  d.levels = scan_levels(w, options.bits, options.scale);
  const std::vector<GroupLevel>& levels = d.levels;
  auto met = std::find_if(levels.begin(), levels.end(), [&](const GroupLevel& l) { return l.rel_error <= target; });
  const std::string t = num(target, 4);
  if (met == levels.end()) {
    d.group = levels.back().group;
    d.target_met = false;
    d.reason = "target rel error " + t + " not met: the finest allowed group " + level_name(d.group, w.cols) +
               " gives " + num(levels.back().rel_error, 4);
  } else {
    d.group = met->group;
    d.reason = "rel error " + num(met->rel_error, 4) + " <= target " + t + " at group " + level_name(d.group, w.cols) +
               (met == levels.begin() ? " (column-wise)" : " (coarsest meeting it)");
  }
  return d;
}

}  // namespace

std::vector<GroupLevel> range_levels(const MatrixView& w) { return scan_levels(w, 0, ScaleRule::Absmax); }

std::vector<GroupLevel> error_levels(const MatrixView& w, int bits, ScaleRule rule, const float* importance) {
  check_bits(bits);
  return scan_levels(w, bits, rule, importance);
}

const char* group_mode_name(GroupMode mode) {
  switch (mode) {
    case GroupMode::Adaptive: return "adaptive";
    case GroupMode::Alpha: return "alpha";
    case GroupMode::Fixed: return "fixed";
    case GroupMode::MaxRelError: return "max-rel-error";
  }
  return "?";
}

double gaussian_rel_error(int bits, int64_t group, ScaleRule rule) {
  check_bits(bits);
  FS_ASSERT(group > 0, "gaussian_rel_error: group must be positive");
  static std::mutex mutex;
  static std::map<std::tuple<int, int64_t, ScaleRule>, double> cache;
  const auto key = std::make_tuple(bits, group, rule);
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = cache.find(key); it != cache.end()) return it->second;
  }
  const int64_t rows = std::max<int64_t>(16, ((int64_t{1} << 17) + group - 1) / group);
  std::vector<float> w(static_cast<size_t>(rows * group));
  uint64_t state = 0x5eed0f6a755ull + static_cast<uint64_t>(group);  // one fixed sample per group size
  for (size_t i = 0; i + 1 < w.size(); i += 2) {  // Box-Muller; group is even or 1 below
    const double u1 = (static_cast<double>(splitmix64(state) >> 11) + 0.5) * 0x1p-53;
    const double u2 = static_cast<double>(splitmix64(state) >> 11) * 0x1p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    w[i] = static_cast<float>(r * std::cos(2 * std::numbers::pi * u2));
    w[i + 1] = static_cast<float>(r * std::sin(2 * std::numbers::pi * u2));
  }
  if (w.size() % 2 == 1) w.back() = 0.5f;
  const double e = quantize(MatrixView{w.data(), DType::F32, rows, group}, bits, group, rule).rel_error;
  std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, e);
  return e;
}

GroupDecision choose_group(const MatrixView& w, const GroupOptions& options) {
  check_bits(options.bits);
  detail::check_matrix(w);
  if (w.cols <= 0) throw Error("cannot choose a group size for a matrix with K=" + std::to_string(w.cols));
  switch (options.mode) {
    case GroupMode::Fixed: return choose_fixed(w, options);
    case GroupMode::Adaptive: return choose_gaussian(w, options);
    case GroupMode::Alpha: return choose_alpha(w, options);
    case GroupMode::MaxRelError: return choose_max_rel_error(w, options);
  }
  FS_ASSERT(false, "choose_group: unknown mode");
  return {};
}

}  // namespace fineserve::quant
