#include "engine/engine.h"

#include <algorithm>
#include <future>

#include "kernels/base.h"

namespace fineserve {

struct Engine::Sequence {
  uint64_t id = 0;  // the request's
  int choice = 0;
  SeqId key = 0;    // this sequence's, in the KV cache
  std::vector<int32_t> tokens;  // prompt + generated
  size_t prompt_len = 0;
  int64_t num_computed = 0;
  Sampler sampler;
  StopChecker stop;
  std::optional<StreamDecoder> decoder;  // absent without a tokenizer
  std::optional<grammar::GrammarConstraint> constraint;  // constrained decoding
  int max_new_tokens = 0;
  int top_logprobs = 0;
  // Prompt logprobs: wanted, and how many prompt positions are scored (kept across preemption:
  // a recomputed prefill does not score them again).
  bool prompt_logprobs = false;
  int64_t prompt_scored = 0;
  int cached_tokens = -1;  // prefix-cache hit at the first admission (-1: not admitted yet)
  std::vector<PositionLogprobs> prompt_lp;

  Sequence(uint64_t i, int c, SeqId k, const GenerationRequest& r, const Tokenizer* tok)
      : id(i), choice(c), key(k), tokens(r.prompt), prompt_len(tokens.size()),
        sampler(choice_params(r.sampling, c), r.stop.eos_token_ids), stop(r.stop), max_new_tokens(r.stop.max_new_tokens), top_logprobs(r.top_logprobs),
        prompt_logprobs(r.prompt_logprobs && c == 0) {
    if (tok) decoder.emplace(*tok);
    if (r.grammar) constraint.emplace(r.grammar);
  }
  int64_t remaining() const { return static_cast<int64_t>(tokens.size()) - num_computed; }
  SequenceTokens view() const {
    const std::span<const int32_t> all(tokens);
    return {all.first(prompt_len), all.subspan(prompt_len)};
  }
  // Choice c draws from its own random stream: seed + c (so choice 0 is what n = 1 gives).
  static SamplingParams choice_params(SamplingParams p, int c) {
    p.seed += static_cast<uint64_t>(c);
    return p;
  }
};

namespace {

int num_blocks_for(const Model& model, const EngineConfig& c) {
  if (c.num_blocks > 0) return c.num_blocks;
  const uint64_t per_block = model.kv_block_bytes(c.block_size);
  const uint64_t n = per_block ? c.kv_cache_bytes / per_block : 0;
  if (n == 0) throw Error("the KV cache budget is smaller than one block (" + std::to_string(per_block) + " bytes)");
  return static_cast<int>(std::min<uint64_t>(n, 1u << 30));
}

}  // namespace

Engine::Engine(Model& model, const Tokenizer* tokenizer, const EngineConfig& config)
    : model_(model), tokenizer_(tokenizer), config_(config), blocks_(num_blocks_for(model, config), config.block_size, config.prefix_caching) {
  if (config_.max_batch_tokens < 1) throw Error("max_batch_tokens must be >= 1");
  if (config_.max_seqs < 1) throw Error("max_seqs must be >= 1");
  config_.num_blocks = blocks_.num_blocks();
  model_.allocate_kv_cache(config_.num_blocks, config_.block_size);
}

Engine::~Engine() = default;

uint64_t Engine::add(GenerationRequest r) {
  const ModelInfo& info = model_.info();
  FS_ASSERT(!r.prompt.empty(), "empty prompt");
  FS_ASSERT(r.n >= 1 && r.top_logprobs >= 0);
  for (int32_t t : r.prompt) FS_ASSERT(t >= 0 && t < info.vocab_size, "prompt token id outside the vocabulary");
  for (const auto& b : r.sampling.logit_bias) FS_ASSERT(b.first < info.vocab_size, "logit_bias id outside the vocabulary");
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.stop.max_new_tokens;
  FS_ASSERT(r.stop.max_new_tokens >= 0 && total <= info.max_context, "the request does not fit the context");
  // Each sequence must fit alone (a property of this engine's cache, which the API does not see).
  if (blocks_.blocks_for_tokens(total) > blocks_.num_blocks())
    throw Error("the request needs more KV-cache blocks than the cache has (" + std::to_string(blocks_.num_blocks()) +
                " blocks of " + std::to_string(config_.block_size) + " tokens)");
  auto& eos = r.stop.eos_token_ids;
  if (!r.ignore_eos && info.eos_token_id >= 0 && std::find(eos.begin(), eos.end(), info.eos_token_id) == eos.end())
    eos.push_back(static_cast<int32_t>(info.eos_token_id));
  if (r.grammar && grammar::GrammarConstraint(r.grammar).is_dead())
    throw Error("the grammar allows no token of this model's vocabulary to start the output");
  const uint64_t id = next_id_++;
  for (int c = 0; c < r.n; ++c) waiting_.push_back(std::make_unique<Sequence>(id, c, next_key_++, r, tokenizer_));
  return id;
}

void Engine::cancel(uint64_t id) {
  std::vector<SeqId> keys;
  for (const auto& s : running_)
    if (s->id == id) keys.push_back(s->key);
  for (const auto& s : waiting_)
    if (s->id == id) keys.push_back(s->key);
  for (SeqId k : keys) finish(k);
}

void Engine::finish(SeqId key) {
  auto match = [key](const std::unique_ptr<Sequence>& s) { return s->key == key; };
  if (blocks_.contains(key)) blocks_.free(key);
  if (auto it = std::find_if(running_.begin(), running_.end(), match); it != running_.end()) {
    running_.erase(it);
    return;
  }
  if (auto it = std::find_if(waiting_.begin(), waiting_.end(), match); it != waiting_.end()) waiting_.erase(it);
}

bool Engine::try_grow(Sequence& seq, int64_t n_tokens) { return blocks_.ensure_capacity(seq.key, n_tokens); }

void Engine::preempt(Sequence& seq) {
  if (blocks_.contains(seq.key)) blocks_.free(seq.key);
  seq.num_computed = 0;
  ++preemptions_;
}

// The n choices of a request share one prefill: choice 0 computes the prompt, and each other
// choice waits until choice 0's prefill is done and its full blocks are committed, so that its own
// admission finds them in the prefix cache and computes only the prompt's last, partial block
// (a shared block is never written to, so that block stays private to each choice). Without prefix
// caching, or for a prompt shorter than one block, there is nothing to share and nobody waits.
// The wait blocks the queue behind it (FCFS) only while choice 0 is still prefilling.
bool Engine::awaits_shared_prefill(const Sequence& s) const {
  if (s.choice == 0 || !blocks_.prefix_caching() || static_cast<int64_t>(s.prompt_len) <= config_.block_size) return false;
  const auto first = [&](const std::unique_ptr<Sequence>& o) { return o->id == s.id && o->choice == 0; };
  if (std::any_of(waiting_.begin(), waiting_.end(), first)) return true;
  const auto it = std::find_if(running_.begin(), running_.end(), first);
  return it != running_.end() && (*it)->num_computed < static_cast<int64_t>((*it)->prompt_len);
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.running = static_cast<int>(running_.size());
  s.waiting = static_cast<int>(waiting_.size());
  s.kv_usage = blocks_.usage();
  s.free_blocks = blocks_.num_free_blocks();
  s.total_blocks = blocks_.num_blocks();
  s.preemptions = preemptions_;
  s.prefix_cache = blocks_.stats();
  return s;
}

std::vector<TokenEvent> Engine::step() {
  struct Scheduled {
    Sequence* seq;
    int64_t take;
  };
  std::vector<Scheduled> plan;
  int64_t budget = config_.max_batch_tokens;

  // 1. Running sequences, oldest first; preempt the youngest when the cache is full.
  for (size_t i = 0; i < running_.size() && budget > 0 && static_cast<int>(plan.size()) < config_.max_seqs;) {
    Sequence& s = *running_[i];
    const int64_t take = std::min(s.remaining(), budget);
    if (try_grow(s, s.num_computed + take)) {
      plan.push_back({&s, take});
      budget -= take;
      ++i;
      continue;
    }
    // Preempt the youngest running sequence (possibly this one) and retry.
    std::unique_ptr<Sequence> victim = std::move(running_.back());
    running_.pop_back();
    preempt(*victim);
    const bool was_self = victim.get() == &s;
    waiting_.push_front(std::move(victim));
    if (was_self) break;
  }
  // 2. Waiting sequences, FCFS, while their chunk fits.
  while (!waiting_.empty() && budget > 0 && static_cast<int>(plan.size()) < config_.max_seqs) {
    Sequence& s = *waiting_.front();
    if (awaits_shared_prefill(s)) break;
    // Prefix caching: start after the longest cached full-block prefix (never the whole sequence,
    // so this step still computes its last token's logits). Without caching the match is empty;
    // a request scoring its prompt (prompt_logprobs) computes every position, so it takes none.
    const int64_t lookup = s.prompt_logprobs ? 0 : static_cast<int64_t>(s.tokens.size()) - 1;
    const PrefixMatch hit = blocks_.match_prefix(s.tokens, lookup);
    const int64_t take = std::min(static_cast<int64_t>(s.tokens.size()) - hit.num_tokens, budget);
    if (!blocks_.allocate(s.key, hit, hit.num_tokens + take)) break;
    s.num_computed = hit.num_tokens;
    if (s.cached_tokens < 0) s.cached_tokens = static_cast<int>(hit.num_tokens);
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    plan.push_back({running_.back().get(), take});
    budget -= take;
  }
  last_step_.seqs = static_cast<int>(plan.size());
  last_step_.tokens = static_cast<int>(config_.max_batch_tokens - budget);
  last_step_.ids.clear();
  for (const Scheduled& p : plan) last_step_.ids.push_back(p.seq->id);
  if (plan.empty()) return {};

  // 3. The step's inputs. Logit rows: the last token of a sequence whose prefill completes (it
  //    samples), and, for prompt logprobs, every prompt position not scored yet (position p's
  //    logits predict prompt token p + 1).
  StepInput in;
  std::vector<SeqId> keys;
  struct Rows {
    Sequence* seq;
    size_t first_row;      // index into logit rows of its first prompt-scoring row
    int64_t first_scored;  // the prompt position that row scores
    int64_t n_scored;      // prompt positions scored in this step
    bool samples;          // its last row samples
  };
  std::vector<Rows> rows;
  in.query_start.push_back(0);
  for (const Scheduled& p : plan) {
    Sequence& s = *p.seq;
    const int64_t begin = s.num_computed, end = s.num_computed + p.take;
    Rows r{&s, in.logit_rows.size(), 0, 0, end == static_cast<int64_t>(s.tokens.size())};
    const auto row0 = static_cast<int64_t>(in.token_ids.size());
    for (int64_t t = begin; t < end; ++t) {
      in.token_ids.push_back(s.tokens[static_cast<size_t>(t)]);
      in.positions.push_back(static_cast<int32_t>(t));
    }
    if (s.prompt_logprobs) {
      const int64_t last_scorable = static_cast<int64_t>(s.prompt_len) - 1;  // exclusive
      const int64_t from = std::max(begin, s.prompt_scored), to = std::min(end, last_scorable);
      r.first_scored = from;
      for (int64_t t = from; t < to; ++t) in.logit_rows.push_back(static_cast<int32_t>(row0 + t - begin));
      r.n_scored = std::max<int64_t>(0, to - from);
    }
    if (r.samples) in.logit_rows.push_back(static_cast<int32_t>(in.token_ids.size()) - 1);
    in.query_start.push_back(static_cast<int32_t>(in.token_ids.size()));
    in.context_len.push_back(static_cast<int32_t>(end));
    keys.push_back(s.key);
    if (r.samples || r.n_scored > 0) rows.push_back(r);
  }
  in.max_blocks = std::max(1, blocks_.max_table_len(keys));
  in.block_table = blocks_.dense_block_table(keys, in.max_blocks);
  const int vocab = static_cast<int>(model_.info().vocab_size);
  const auto row = [&](size_t i) { return logits_.data() + i * static_cast<size_t>(vocab); };
  logits_.resize(std::max<size_t>(in.logit_rows.size(), 1) * static_cast<size_t>(vocab));
  // Grammar masks of the constrained sequences that sample in this step, computed on another
  // thread while the model runs: a state's first mask walks the vocabulary's trie (the grammar
  // caches it), which the forward pass hides; the sampler then only applies it.
  std::vector<std::shared_ptr<const grammar::TokenMask>> masks(rows.size());
  const auto constrained = [](const Rows& r) { return r.samples && r.seq->constraint && r.seq->max_new_tokens > 0; };
  std::future<void> masks_ready;
  if (std::any_of(rows.begin(), rows.end(), constrained))
    masks_ready = std::async(std::launch::async, [&] {
      for (size_t i = 0; i < rows.size(); ++i)
        if (constrained(rows[i])) masks[i] = rows[i].seq->constraint->allowed();
    });
  model_.forward(in, logits_.data());
  if (masks_ready.valid()) masks_ready.get();
  for (const Scheduled& p : plan) {
    p.seq->num_computed += p.take;
    blocks_.commit(p.seq->key, p.seq->tokens, p.seq->num_computed);  // prefix caching
  }

  // 4. Score the prompt, sample, check stops, report.
  std::vector<TokenEvent> events;
  std::vector<SeqId> done;
  for (size_t ri = 0; ri < rows.size(); ++ri) {
    const Rows& r = rows[ri];
    Sequence& s = *r.seq;
    for (int64_t i = 0; i < r.n_scored; ++i) {
      const auto target = s.tokens[static_cast<size_t>(r.first_scored + i + 1)];
      s.prompt_lp.push_back(logprobs_of(row(r.first_row + static_cast<size_t>(i)), vocab, target, s.top_logprobs));
    }
    s.prompt_scored = std::max(s.prompt_scored, r.first_scored + r.n_scored);
    if (!r.samples) continue;
    float* logits = row(r.first_row + static_cast<size_t>(r.n_scored));
    TokenEvent e;
    e.request_id = s.id;
    e.choice = s.choice;
    e.cached_tokens = std::max(s.cached_tokens, 0);
    if (s.tokens.size() == s.prompt_len) e.prompt_logprobs = std::move(s.prompt_lp);
    if (s.max_new_tokens == 0) {
      e.finish = FinishReason::Length;  // prompt scoring only
    } else {
      // Grammar: only tokens the automaton allows (before logprobs, as vLLM applies its bitmask).
      if (s.constraint) masks[ri]->apply(logits, vocab);
      const SampledToken tok = s.sampler.sample(logits, vocab, s.view());
      PositionLogprobs lp = logprobs_of(logits, vocab, tok.token, s.top_logprobs);
      s.tokens.push_back(tok.token);
      StopUpdate u = s.stop.push(tok.token, s.decoder ? s.decoder->feed(tok.token) : std::string());
      // Grammar: when no token may follow (the output is complete and EOS is not allowed), end here.
      if (s.constraint && (!s.constraint->advance(tok.token) || s.constraint->is_dead()) && !u.finish)
        u.text += s.stop.flush(), u.finish = FinishReason::GrammarEnd;
      e.token = tok.token;
      e.logprob = lp.logprob;
      e.top = std::move(lp.top);
      e.text = std::move(u.text);
      e.finish = u.finish;
    }
    if (e.finish) done.push_back(s.key);
    events.push_back(std::move(e));
  }
  for (SeqId k : done) finish(k);
  return events;
}

std::vector<GenerationResult> Engine::generate(std::vector<GenerationRequest> requests,
                                               const std::function<void(const TokenEvent&)>& on_event) {
  std::vector<uint64_t> ids;
  for (auto& r : requests) ids.push_back(add(std::move(r)));
  std::vector<GenerationResult> results(ids.size());
  auto index_of = [&](uint64_t id) {
    return static_cast<size_t>(std::find(ids.begin(), ids.end(), id) - ids.begin());
  };
  while (!idle()) {
    for (const TokenEvent& e : step()) {
      if (e.choice != 0 || e.token < 0) {
        if (on_event) on_event(e);
        continue;
      }
      GenerationResult& res = results[index_of(e.request_id)];
      res.tokens.push_back(e.token);
      res.text += e.text;
      if (e.finish) res.finish = *e.finish;
      if (on_event) on_event(e);
    }
  }
  return results;
}

}  // namespace fineserve
