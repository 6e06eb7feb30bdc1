// Grammar tree -> deterministic automaton over bytes.
//
// Thompson construction to an NFA, then subset construction to a DFA over byte classes (bytes
// that every byte set of the grammar treats alike share one column, so a JSON grammar needs a few
// dozen columns instead of 256). States from which no accepting state can be reached are removed:
// every live state can still finish, so a constrained sequence never walks into a dead end that
// only shows later. Both stages stop with fineserve::Error at a size limit: grammars come from
// user input and must never exhaust memory or time.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "engine/grammar/regex.h"

namespace fineserve::grammar {

struct AutomatonLimits {
  int max_nfa_states = 400000;
  int max_dfa_states = 30000;
};

class Dfa {
 public:
  static constexpr int32_t kDead = -1;

  int32_t start() const { return start_; }  // kDead when the language is empty
  int32_t num_states() const { return static_cast<int32_t>(accepting_.size()); }
  int num_classes() const { return num_classes_; }
  int32_t next(int32_t state, uint8_t byte) const {
    return next_[static_cast<size_t>(state) * static_cast<size_t>(num_classes_) + class_of_[byte]];
  }
  bool accepting(int32_t state) const { return state >= 0 && accepting_[static_cast<size_t>(state)]; }
  // Runs `bytes` from `state`; kDead when they leave the language's prefixes.
  int32_t walk(int32_t state, std::string_view bytes) const;
  bool matches(std::string_view bytes) const { return accepting(walk(start_, bytes)); }

 private:
  friend Dfa compile_dfa(const Node& root, const AutomatonLimits& limits);
  int32_t start_ = kDead;
  int num_classes_ = 0;
  std::array<uint8_t, 256> class_of_{};
  std::vector<int32_t> next_;  // [state, class] -> state or kDead
  std::vector<bool> accepting_;
};

// Throws fineserve::Error when a limit is exceeded.
Dfa compile_dfa(const Node& root, const AutomatonLimits& limits = {});

}  // namespace fineserve::grammar
