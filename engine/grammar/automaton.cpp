#include "engine/grammar/automaton.h"

#include <algorithm>
#include <string>
#include <unordered_map>

#include "kernels/base.h"

namespace fineserve::grammar {

int32_t Dfa::walk(int32_t state, std::string_view bytes) const {
  for (unsigned char b : bytes) {
    if (state < 0) return kDead;
    state = next(state, b);
  }
  return state;
}

namespace {

// Thompson NFA: each state has at most one byte transition plus any number of epsilon moves.
struct NfaState {
  int32_t set = -1;   // index into Nfa::sets, or -1 for none
  int32_t next = -1;  // target of the byte transition
  std::vector<int32_t> eps;
};

struct Frag {
  int32_t start, end;
};

class NfaBuilder {
 public:
  explicit NfaBuilder(const AutomatonLimits& limits) : limits_(limits) {}

  std::vector<NfaState> states;
  std::vector<ByteSet> sets;

  int32_t add() {
    if (static_cast<int>(states.size()) >= limits_.max_nfa_states)
      throw Error("grammar too large: more than " + std::to_string(limits_.max_nfa_states) +
                  " automaton states before determinization (reduce repetition counts, "
                  "maxLength/maxItems or the schema size)");
    states.emplace_back();
    return static_cast<int32_t>(states.size() - 1);
  }
  void eps(int32_t from, int32_t to) { states[static_cast<size_t>(from)].eps.push_back(to); }

  Frag emit(const Node& n) {
    switch (n.kind) {
      case Node::Kind::Empty: {
        const int32_t s = add();
        return {s, s};
      }
      case Node::Kind::Nothing:
        return {add(), add()};
      case Node::Kind::Bytes: {
        const int32_t s = add(), e = add();
        sets.push_back(n.bytes);
        states[static_cast<size_t>(s)].set = static_cast<int32_t>(sets.size() - 1);
        states[static_cast<size_t>(s)].next = e;
        return {s, e};
      }
      case Node::Kind::Concat: {
        Frag f = emit(*n.children[0]);
        for (size_t i = 1; i < n.children.size(); ++i) {
          const Frag g = emit(*n.children[i]);
          eps(f.end, g.start);
          f.end = g.end;
        }
        return f;
      }
      case Node::Kind::Alt: {
        const int32_t s = add(), e = add();
        for (const auto& c : n.children) {
          const Frag g = emit(*c);
          eps(s, g.start);
          eps(g.end, e);
        }
        return {s, e};
      }
      case Node::Kind::Repeat:
        return emit_repeat(*n.children[0], n.min, n.max);
      case Node::Kind::Members:
        return emit_members(n);
    }
    FS_ASSERT(false, "unknown node kind");
    return {0, 0};
  }

 private:
  Frag emit_repeat(const Node& child, int min, int max) {
    const int32_t s = add();
    int32_t cur = s;
    for (int i = 0; i < min; ++i) {
      const Frag g = emit(child);
      eps(cur, g.start);
      cur = g.end;
    }
    const int32_t e = add();
    if (max < 0) {
      const Frag g = emit(child);
      eps(cur, g.start);
      eps(g.end, cur);
      eps(cur, e);
      return {s, e};
    }
    for (int i = min; i < max; ++i) {
      eps(cur, e);  // stop here
      const Frag g = emit(child);
      eps(cur, g.start);
      cur = g.end;
    }
    eps(cur, e);
    return {s, e};
  }

  // at[i][f]: before member i, f = whether a member has been written (so a separator comes
  // first). Only the states that can be reached are built: at[i][0] needs every member before i
  // to be optional.
  Frag emit_members(const Node& n) {
    const size_t count = n.children.size();
    std::vector<std::array<int32_t, 2>> at(count + 1, {-1, -1});
    at[0][0] = add();
    for (size_t i = 0; i < count; ++i) {
      at[i + 1][1] = at[i + 1][1] >= 0 ? at[i + 1][1] : add();
      for (int f = 0; f < 2; ++f) {
        if (at[i][static_cast<size_t>(f)] < 0) continue;
        const int32_t from = at[i][static_cast<size_t>(f)];
        int32_t cur = from;
        if (f) {
          const Frag sep = emit(*n.separator);
          eps(cur, sep.start);
          cur = sep.end;
        }
        const Frag m = emit(*n.children[i]);
        eps(cur, m.start);
        eps(m.end, at[i + 1][1]);
        if (!n.required[i]) {
          if (at[i + 1][static_cast<size_t>(f)] < 0) at[i + 1][static_cast<size_t>(f)] = add();
          eps(from, at[i + 1][static_cast<size_t>(f)]);
        }
      }
    }
    const int32_t e = add();
    if (n.extra) {
      // Extra members: from "nothing written" the first needs no separator; after that each one
      // does and they loop on the "written" state.
      if (at[count][1] < 0) at[count][1] = add();
      if (at[count][0] >= 0) {
        const Frag m = emit(*n.extra);
        eps(at[count][0], m.start);
        eps(m.end, at[count][1]);
      }
      const Frag sep = emit(*n.separator);
      const Frag m = emit(*n.extra);
      eps(at[count][1], sep.start);
      eps(sep.end, m.start);
      eps(m.end, at[count][1]);
    }
    for (int f = 0; f < 2; ++f)
      if (at[count][static_cast<size_t>(f)] >= 0) eps(at[count][static_cast<size_t>(f)], e);
    return {at[0][0], e};
  }

  const AutomatonLimits& limits_;
};

struct VectorHash {
  size_t operator()(const std::vector<int32_t>& v) const {
    uint64_t h = 1469598103934665603ull;
    for (int32_t x : v) h = (h ^ static_cast<uint32_t>(x)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

}  // namespace

Dfa compile_dfa(const Node& root, const AutomatonLimits& limits) {
  NfaBuilder nfa(limits);
  const Frag top = nfa.emit(root);
  const int32_t accept = top.end;

  // Byte classes: refine the partition of 0..255 by every byte set of the grammar.
  std::array<uint16_t, 256> cls{};
  int num_classes = 1;
  {
    std::vector<ByteSet> distinct = nfa.sets;
    auto less = [](const ByteSet& a, const ByteSet& b) { return a.to_string() < b.to_string(); };
    std::sort(distinct.begin(), distinct.end(), less);
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    for (const ByteSet& s : distinct) {
      std::unordered_map<uint32_t, uint16_t> remap;
      for (int b = 0; b < 256; ++b) {
        const uint32_t key = (static_cast<uint32_t>(cls[static_cast<size_t>(b)]) << 1) | (s[static_cast<size_t>(b)] ? 1u : 0u);
        auto [it, inserted] = remap.emplace(key, static_cast<uint16_t>(remap.size()));
        cls[static_cast<size_t>(b)] = it->second;
      }
      num_classes = static_cast<int>(remap.size());
    }
  }
  std::vector<int> rep(static_cast<size_t>(num_classes), -1);
  for (int b = 255; b >= 0; --b) rep[cls[static_cast<size_t>(b)]] = b;

  // Subset construction.
  std::vector<char> mark(nfa.states.size(), 0);
  std::vector<int32_t> stack;
  auto closure = [&](std::vector<int32_t> seeds) {
    std::vector<int32_t> out;
    stack.assign(seeds.begin(), seeds.end());
    for (int32_t s : seeds) mark[static_cast<size_t>(s)] = 1;
    while (!stack.empty()) {
      const int32_t s = stack.back();
      stack.pop_back();
      out.push_back(s);
      for (int32_t t : nfa.states[static_cast<size_t>(s)].eps)
        if (!mark[static_cast<size_t>(t)]) mark[static_cast<size_t>(t)] = 1, stack.push_back(t);
    }
    for (int32_t s : out) mark[static_cast<size_t>(s)] = 0;
    // Only states with a byte move, and the accepting state, tell DFA states apart.
    std::vector<int32_t> kept;
    for (int32_t s : out)
      if (nfa.states[static_cast<size_t>(s)].set >= 0 || s == accept) kept.push_back(s);
    std::sort(kept.begin(), kept.end());
    return kept;
  };

  std::unordered_map<std::vector<int32_t>, int32_t, VectorHash> ids;
  std::vector<std::vector<int32_t>> subsets;
  std::vector<int32_t> next;
  auto intern = [&](std::vector<int32_t> key) -> int32_t {
    if (key.empty()) return Dfa::kDead;
    auto it = ids.find(key);
    if (it != ids.end()) return it->second;
    if (static_cast<int>(subsets.size()) >= limits.max_dfa_states)
      throw Error("grammar too large: more than " + std::to_string(limits.max_dfa_states) +
                  " automaton states (reduce repetition counts, maxLength/maxItems, enum sizes "
                  "or the nesting of the schema)");
    const auto id = static_cast<int32_t>(subsets.size());
    ids.emplace(key, id);
    subsets.push_back(std::move(key));
    return id;
  };
  const int32_t start = intern(closure({top.start}));
  std::vector<int32_t> seeds;
  for (size_t d = 0; d < subsets.size(); ++d) {
    for (int c = 0; c < num_classes; ++c) {
      seeds.clear();
      const auto b = static_cast<size_t>(rep[static_cast<size_t>(c)]);
      for (int32_t s : subsets[d]) {
        const NfaState& st = nfa.states[static_cast<size_t>(s)];
        if (st.set >= 0 && nfa.sets[static_cast<size_t>(st.set)][b] && !mark[static_cast<size_t>(st.next)]) {
          mark[static_cast<size_t>(st.next)] = 1;
          seeds.push_back(st.next);
        }
      }
      for (int32_t s : seeds) mark[static_cast<size_t>(s)] = 0;
      // `subsets` may grow (and reallocate) inside intern; index, do not hold references.
      next.push_back(intern(closure(seeds)));
    }
  }
  const auto n = static_cast<int32_t>(subsets.size());

  // Keep only states that can still reach an accepting state.
  std::vector<bool> accepting(static_cast<size_t>(n));
  std::vector<std::vector<int32_t>> preds(static_cast<size_t>(n));
  for (int32_t d = 0; d < n; ++d) {
    accepting[static_cast<size_t>(d)] = std::binary_search(subsets[static_cast<size_t>(d)].begin(), subsets[static_cast<size_t>(d)].end(), accept);
    for (int c = 0; c < num_classes; ++c) {
      const int32_t t = next[static_cast<size_t>(d) * static_cast<size_t>(num_classes) + static_cast<size_t>(c)];
      if (t >= 0) preds[static_cast<size_t>(t)].push_back(d);
    }
  }
  std::vector<bool> live(static_cast<size_t>(n), false);
  std::vector<int32_t> work;
  for (int32_t d = 0; d < n; ++d)
    if (accepting[static_cast<size_t>(d)]) live[static_cast<size_t>(d)] = true, work.push_back(d);
  while (!work.empty()) {
    const int32_t d = work.back();
    work.pop_back();
    for (int32_t p : preds[static_cast<size_t>(d)])
      if (!live[static_cast<size_t>(p)]) live[static_cast<size_t>(p)] = true, work.push_back(p);
  }
  std::vector<int32_t> renum(static_cast<size_t>(n), Dfa::kDead);
  int32_t m = 0;
  for (int32_t d = 0; d < n; ++d)
    if (live[static_cast<size_t>(d)]) renum[static_cast<size_t>(d)] = m++;

  Dfa dfa;
  dfa.num_classes_ = num_classes;
  for (int b = 0; b < 256; ++b) dfa.class_of_[static_cast<size_t>(b)] = static_cast<uint8_t>(cls[static_cast<size_t>(b)]);
  dfa.start_ = start >= 0 ? renum[static_cast<size_t>(start)] : Dfa::kDead;
  dfa.next_.assign(static_cast<size_t>(m) * static_cast<size_t>(num_classes), Dfa::kDead);
  dfa.accepting_.assign(static_cast<size_t>(m), false);
  for (int32_t d = 0; d < n; ++d) {
    const int32_t r = renum[static_cast<size_t>(d)];
    if (r < 0) continue;
    dfa.accepting_[static_cast<size_t>(r)] = accepting[static_cast<size_t>(d)];
    for (int c = 0; c < num_classes; ++c) {
      const int32_t t = next[static_cast<size_t>(d) * static_cast<size_t>(num_classes) + static_cast<size_t>(c)];
      dfa.next_[static_cast<size_t>(r) * static_cast<size_t>(num_classes) + static_cast<size_t>(c)] = t >= 0 ? renum[static_cast<size_t>(t)] : Dfa::kDead;
    }
  }
  return dfa;
}

}  // namespace fineserve::grammar
