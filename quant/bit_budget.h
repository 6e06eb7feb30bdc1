// A bit budget across a model (`quantize --target-bits B`): each quantized matrix gets its bits
// (8 or 4) and group size so that the model's weighted quantization error is smallest at an average
// of at most B bits per weight, counting codes and fp16 scales (bits + 16 / group).
//
// The error of a matrix m at an option o is  n_m · e_m(o)² · salience_m, with n_m its weight count,
// e_m(o) its relative Frobenius error ||W - Q(W)||_F / ||W||_F and salience_m a prior on how much
// the model's output suffers per unit of that matrix's relative error (SaliencePrior: by the
// matrix's name; 1 where none matches, which is every matrix by default): every weight's relative
// signal-to-noise counts the same unless the user says otherwise. The allocation is a multiple-choice knapsack, solved by a Lagrange multiplier λ (each
// matrix takes the option minimising error + λ · bits; λ is bisected to the smallest value that
// fits the budget), then greedy upgrades with the best error reduction per extra bit while budget
// is left. Data-free: the errors come from quantizing the weights themselves.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fineserve::quant {

// Matrices whose name matches `pattern` (ECMAScript regex, searched) have their error weighted by
// `weight`; the weights of all matching priors multiply.
struct SaliencePrior {
  std::string pattern;
  double weight = 1;
};

// The default priors: none (every matrix weighs 1). Class priors in the spirit of llama.cpp's mixes
// (v_proj x4, down_proj x2) and layer-position priors were measured and made SmolLM2-135M worse at
// 4.5 bits (docs/quantization.md), so they are options (`quantize --salience`), not defaults.
std::vector<SaliencePrior> default_salience_priors();

// The product of the weights of the priors matching `name`. Throws fineserve::Error for an invalid
// pattern or a non-positive weight.
double salience_of(const std::string& name, const std::vector<SaliencePrior>& priors);

struct BudgetOption {
  int bits = 0;
  int64_t group = 0;
  double bits_per_weight = 0;  // bits + 16 / group
  double rel_error = 0;        // relative Frobenius error of the matrix at this option
};

struct BudgetMatrix {
  std::string name;
  int64_t weights = 0;                // rows * cols
  double salience = 1;                // weight of this matrix's error (1 = data-free)
  std::vector<BudgetOption> options;  // at least one
};

struct BudgetAllocation {
  std::vector<size_t> choice;     // per matrix: the index of its option
  double bits_per_weight = 0;     // the weighted average achieved (<= the target when feasible)
  double weighted_error = 0;      // sum of weights * salience * rel_error^2 over all weights
  bool feasible = true;           // false when even the cheapest options exceed the target
};

// Throws fineserve::Error for a non-positive target or a matrix without options.
BudgetAllocation allocate_bits(const std::vector<BudgetMatrix>& matrices, double target_bits);

}  // namespace fineserve::quant
