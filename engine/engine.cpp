#include "engine/engine.h"

#include <algorithm>

#include "kernels/base.h"

namespace fineserve {

struct Engine::Sequence {
  uint64_t id = 0;
  std::vector<int32_t> tokens;  // prompt + generated
  size_t prompt_len = 0;
  int64_t num_computed = 0;
  Sampler sampler;
  StopChecker stop;
  std::optional<StreamDecoder> decoder;  // absent without a tokenizer
  std::optional<grammar::GrammarConstraint> constraint;  // constrained decoding

  Sequence(uint64_t i, GenerationRequest&& r, const Tokenizer* tok)
      : id(i), tokens(std::move(r.prompt)), prompt_len(tokens.size()), sampler(r.sampling), stop(std::move(r.stop)) {
    if (tok) decoder.emplace(*tok);
    if (r.grammar) constraint.emplace(r.grammar);
  }
  int64_t remaining() const { return static_cast<int64_t>(tokens.size()) - num_computed; }
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
    : model_(model), tokenizer_(tokenizer), config_(config), blocks_(num_blocks_for(model, config), config.block_size) {
  if (config_.max_batch_tokens < 1) throw Error("max_batch_tokens must be >= 1");
  if (config_.max_seqs < 1) throw Error("max_seqs must be >= 1");
  config_.num_blocks = blocks_.num_blocks();
  model_.allocate_kv_cache(config_.num_blocks, config_.block_size);
}

Engine::~Engine() = default;

uint64_t Engine::add(GenerationRequest r) {
  if (r.prompt.empty()) throw Error("the prompt is empty");
  const ModelInfo& info = model_.info();
  for (int32_t t : r.prompt)
    if (t < 0 || t >= info.vocab_size) throw Error("token id " + std::to_string(t) + " is outside the vocabulary");
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.stop.max_new_tokens;
  if (static_cast<int64_t>(r.prompt.size()) >= info.max_context)
    throw Error("the prompt has " + std::to_string(r.prompt.size()) + " tokens; the model's context is " +
                std::to_string(info.max_context) + " tokens");
  r.stop.max_new_tokens = static_cast<int>(std::min<int64_t>(r.stop.max_new_tokens, info.max_context - static_cast<int64_t>(r.prompt.size())));
  if (blocks_.blocks_for_tokens(std::min(total, info.max_context)) > blocks_.num_blocks())
    throw Error("the request needs more KV-cache blocks than the cache has (" + std::to_string(blocks_.num_blocks()) +
                " blocks of " + std::to_string(config_.block_size) + " tokens)");
  if (!r.ignore_eos && info.eos_token_id >= 0 && r.stop.eos_token_ids.empty()) r.stop.eos_token_ids.push_back(static_cast<int32_t>(info.eos_token_id));
  if (r.grammar && grammar::GrammarConstraint(r.grammar).is_dead())
    throw Error("the grammar allows no token of this model's vocabulary to start the output");
  const uint64_t id = next_id_++;
  waiting_.push_back(std::make_unique<Sequence>(id, std::move(r), tokenizer_));
  return id;
}

void Engine::cancel(uint64_t id) { finish(id); }

void Engine::finish(uint64_t id) {
  auto match = [id](const std::unique_ptr<Sequence>& s) { return s->id == id; };
  if (auto it = std::find_if(running_.begin(), running_.end(), match); it != running_.end()) {
    if (blocks_.contains(id)) blocks_.free(static_cast<SeqId>(id));
    running_.erase(it);
    return;
  }
  if (auto it = std::find_if(waiting_.begin(), waiting_.end(), match); it != waiting_.end()) {
    if (blocks_.contains(static_cast<SeqId>(id))) blocks_.free(static_cast<SeqId>(id));
    waiting_.erase(it);
  }
}

bool Engine::try_grow(Sequence& seq, int64_t n_tokens) {
  return blocks_.ensure_capacity(static_cast<SeqId>(seq.id), n_tokens);
}

void Engine::preempt(Sequence& seq) {
  if (blocks_.contains(static_cast<SeqId>(seq.id))) blocks_.free(static_cast<SeqId>(seq.id));
  seq.num_computed = 0;
  ++preemptions_;
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.running = static_cast<int>(running_.size());
  s.waiting = static_cast<int>(waiting_.size());
  s.kv_usage = blocks_.usage();
  s.free_blocks = blocks_.num_free_blocks();
  s.total_blocks = blocks_.num_blocks();
  s.preemptions = preemptions_;
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
    const int64_t take = std::min(s.remaining(), budget);
    if (!try_grow(s, s.num_computed + take)) break;
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

  // 3. The step's inputs.
  StepInput in;
  std::vector<SeqId> ids;
  std::vector<Sequence*> sampled;
  in.query_start.push_back(0);
  for (const Scheduled& p : plan) {
    Sequence& s = *p.seq;
    for (int64_t t = s.num_computed; t < s.num_computed + p.take; ++t) {
      in.token_ids.push_back(s.tokens[static_cast<size_t>(t)]);
      in.positions.push_back(static_cast<int32_t>(t));
    }
    in.query_start.push_back(static_cast<int32_t>(in.token_ids.size()));
    in.context_len.push_back(static_cast<int32_t>(s.num_computed + p.take));
    ids.push_back(static_cast<SeqId>(s.id));
    if (s.num_computed + p.take == static_cast<int64_t>(s.tokens.size())) {
      in.logit_rows.push_back(static_cast<int32_t>(in.token_ids.size()) - 1);
      sampled.push_back(&s);
    }
  }
  in.max_blocks = std::max(1, blocks_.max_table_len(ids));
  in.block_table = blocks_.dense_block_table(ids, in.max_blocks);
  const auto vocab = static_cast<size_t>(model_.info().vocab_size);
  logits_.resize(std::max<size_t>(in.logit_rows.size(), 1) * vocab);
  model_.forward(in, logits_.data());
  for (const Scheduled& p : plan) p.seq->num_computed += p.take;

  // 4. Sample, check stops, report.
  std::vector<TokenEvent> events;
  std::vector<uint64_t> done;
  for (size_t r = 0; r < sampled.size(); ++r) {
    Sequence& s = *sampled[r];
    if (s.constraint) s.constraint->mask_logits(logits_.data() + r * vocab, static_cast<int32_t>(vocab));
    const SampledToken tok = s.sampler.sample(logits_.data() + r * vocab, static_cast<int>(vocab), s.tokens);
    s.tokens.push_back(tok.token);
    StopUpdate u = s.stop.push(tok.token, s.decoder ? s.decoder->feed(tok.token) : std::string());
    // Grammar: when no token may follow (the output is complete and EOS is not allowed), end here.
    if (s.constraint && (!s.constraint->advance(tok.token) || s.constraint->is_dead()) && !u.finish)
      u.text += s.stop.flush(), u.finish = FinishReason::GrammarEnd;
    TokenEvent e{s.id, tok.token, tok.logprob, std::move(u.text), u.finish};
    if (e.finish) done.push_back(s.id);
    events.push_back(std::move(e));
  }
  for (uint64_t id : done) finish(id);
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
