// libFuzzer target: the grammar compilers, which are fed user input (JSON schemas and regexes
// from requests). Input: one byte choosing the compiler, then the schema or pattern. Checked on
// every input:
//   - compiling either succeeds or throws fineserve::Error (never crashes, hangs or exhausts
//     memory: the automaton limits below are small so that every input stays quick);
//   - a compiled automaton's live states can all still reach acceptance, so from the start state
//     a shortest walk to an accepting state exists and is found within the state count.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/grammar/automaton.h"
#include "engine/grammar/json_schema.h"
#include "engine/grammar/regex.h"
#include "kernels/base.h"

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_grammar: %s\n", what);
    std::abort();
  }
}

// Breadth-first from the start: some accepting state must be reachable.
void check_reaches_acceptance(const fineserve::grammar::Dfa& dfa) {
  if (dfa.start() < 0) return;
  std::vector<bool> seen(static_cast<size_t>(dfa.num_states()), false);
  std::deque<int32_t> queue{dfa.start()};
  seen[static_cast<size_t>(dfa.start())] = true;
  while (!queue.empty()) {
    const int32_t s = queue.front();
    queue.pop_front();
    if (dfa.accepting(s)) return;
    for (int b = 0; b < 256; ++b) {
      const int32_t t = dfa.next(s, static_cast<uint8_t>(b));
      if (t >= 0 && !seen[static_cast<size_t>(t)]) seen[static_cast<size_t>(t)] = true, queue.push_back(t);
    }
  }
  check(false, "a live automaton cannot reach an accepting state");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  const fineserve::grammar::AutomatonLimits limits{.max_nfa_states = 20000, .max_dfa_states = 2000};
  try {
    fineserve::grammar::NodePtr root;
    if (data[0] & 1) {
      fineserve::grammar::RegexLimits rl;
      rl.max_repeat = 100;
      root = fineserve::grammar::parse_regex(text, rl);
    } else {
      const auto schema = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
      if (schema.is_discarded()) return 0;
      fineserve::grammar::JsonGrammarOptions o;
      o.max_repeat = 100;
      o.max_any_depth = 2;
      root = fineserve::grammar::json_schema_grammar(schema, o);
    }
    check_reaches_acceptance(fineserve::grammar::compile_dfa(*root, limits));
  } catch (const fineserve::Error&) {
    // A clear rejection is a valid outcome.
  }
  return 0;
}
