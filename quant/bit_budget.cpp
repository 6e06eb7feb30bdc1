#include "quant/bit_budget.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <regex>

#include "kernels/base.h"

namespace fineserve::quant {
namespace {

double cost(const BudgetMatrix& m, const BudgetOption& o) { return static_cast<double>(m.weights) * o.bits_per_weight; }
double error(const BudgetMatrix& m, const BudgetOption& o) {
  return static_cast<double>(m.weights) * m.salience * o.rel_error * o.rel_error;
}

// Each matrix's option minimising error + λ · bits (ties: fewer bits).
std::vector<size_t> best_for(const std::vector<BudgetMatrix>& ms, double lambda) {
  std::vector<size_t> choice(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) {
    double best = std::numeric_limits<double>::infinity();
    for (size_t j = 0; j < ms[i].options.size(); ++j) {
      const BudgetOption& o = ms[i].options[j];
      const double v = error(ms[i], o) + lambda * cost(ms[i], o);
      if (v < best || (v == best && o.bits_per_weight < ms[i].options[choice[i]].bits_per_weight)) {
        best = v;
        choice[i] = j;
      }
    }
  }
  return choice;
}

double total_bits(const std::vector<BudgetMatrix>& ms, const std::vector<size_t>& choice) {
  double b = 0;
  for (size_t i = 0; i < ms.size(); ++i) b += cost(ms[i], ms[i].options[choice[i]]);
  return b;
}

}  // namespace

std::vector<SaliencePrior> default_salience_priors() { return {}; }

double salience_of(const std::string& name, const std::vector<SaliencePrior>& priors) {
  double s = 1;
  for (const SaliencePrior& p : priors) {
    if (!(p.weight > 0) || !std::isfinite(p.weight))
      throw Error("the salience of '" + p.pattern + "' must be a positive number");
    try {
      if (std::regex_search(name, std::regex(p.pattern))) s *= p.weight;
    } catch (const std::regex_error& e) {
      throw Error("invalid salience pattern '" + p.pattern + "': " + e.what());
    }
  }
  return s;
}

BudgetAllocation allocate_bits(const std::vector<BudgetMatrix>& ms, double target_bits) {
  if (!(target_bits > 0) || !std::isfinite(target_bits))
    throw Error("the bit budget must be a positive number of bits per weight");
  double n = 0;
  for (const BudgetMatrix& m : ms) {
    if (m.options.empty()) throw Error("matrix " + m.name + " has no quantization option");
    n += static_cast<double>(m.weights);
  }
  BudgetAllocation a;
  if (ms.empty()) return a;
  const double budget = target_bits * n;

  // The cheapest option of every matrix: the floor of what any allocation costs.
  std::vector<size_t> cheapest(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) {
    const auto& os = ms[i].options;
    cheapest[i] = static_cast<size_t>(std::min_element(os.begin(), os.end(), [](const BudgetOption& x, const BudgetOption& y) {
                                        return x.bits_per_weight < y.bits_per_weight ||
                                               (x.bits_per_weight == y.bits_per_weight && x.rel_error < y.rel_error);
                                      }) - os.begin());
  }
  if (total_bits(ms, cheapest) > budget) {
    a.choice = cheapest;
    a.feasible = false;
  } else {
    // λ = 0 takes the most accurate option everywhere; bisect (on a log scale) for the smallest λ
    // whose choice fits. Error per weight is at most ~1 and bits at least ~1, so λ <= 1e3 always fits
    // no worse than the cheapest options.
    std::vector<size_t> choice = best_for(ms, 0);
    if (total_bits(ms, choice) > budget) {
      double lo = 1e-12, hi = 1e3;
      std::vector<size_t> fit = best_for(ms, hi);
      if (total_bits(ms, fit) > budget) fit = cheapest;
      for (int it = 0; it < 100; ++it) {
        const double mid = std::sqrt(lo * hi);
        std::vector<size_t> c = best_for(ms, mid);
        if (total_bits(ms, c) <= budget) {
          hi = mid;
          fit = std::move(c);
        } else {
          lo = mid;
        }
      }
      choice = std::move(fit);
      // Spend what the bisection left: the upgrade with the largest error reduction per extra bit
      // that still fits, until none does.
      double used = total_bits(ms, choice);
      for (;;) {
        double best_gain = 0;
        size_t bi = 0, bj = 0;
        for (size_t i = 0; i < ms.size(); ++i) {
          const BudgetOption& cur = ms[i].options[choice[i]];
          for (size_t j = 0; j < ms[i].options.size(); ++j) {
            const BudgetOption& o = ms[i].options[j];
            const double extra = cost(ms[i], o) - cost(ms[i], cur);
            const double gain = error(ms[i], cur) - error(ms[i], o);
            if (extra <= 0 || gain <= 0 || used + extra > budget) continue;
            if (gain / extra > best_gain) {
              best_gain = gain / extra;
              bi = i;
              bj = j;
            }
          }
        }
        if (best_gain == 0) break;
        used += cost(ms[bi], ms[bi].options[bj]) - cost(ms[bi], ms[bi].options[choice[bi]]);
        choice[bi] = bj;
      }
    }
    a.choice = std::move(choice);
  }
  double err = 0;
  for (size_t i = 0; i < ms.size(); ++i) err += error(ms[i], ms[i].options[a.choice[i]]);
  a.weighted_error = err;
  a.bits_per_weight = n > 0 ? total_bits(ms, a.choice) / n : 0;
  return a;
}

}  // namespace fineserve::quant
