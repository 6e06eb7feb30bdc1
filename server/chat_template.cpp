// Chat templates and chat formats: a Hugging Face chat template compiled by the Jinja interpreter
// in server/jinja/ (lexer -> parser -> renderer), the built-in ChatML format, and finding a
// checkpoint's template.
#include "server/chat_template.h"

#include <fstream>
#include <optional>
#include <random>
#include <sstream>

#include "server/jinja/lexer.h"
#include "server/jinja/parser.h"
#include "server/jinja/renderer.h"

namespace fineserve {

using Json = nlohmann::ordered_json;

struct ChatTemplate::Impl : jinja::Template {
  std::string source;  // as given
};

// ---- ChatTemplate ------------------------------------------------------------------------------

ChatTemplate::ChatTemplate(const std::string& source, std::string name, ChatTemplateLimits limits)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.name = std::move(name);
  m.source = source;
  m.limits = limits;
  // As Jinja: \r\n and \r become \n, and one trailing newline is dropped (keep_trailing_newline off).
  m.normalized.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      m.normalized += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      m.normalized += source[i];
    }
  }
  if (!m.normalized.empty() && m.normalized.back() == '\n') m.normalized.pop_back();
  auto fail = [&m](size_t pos, const std::string& msg) {
    throw Error(m.name + ":" + jinja::position_of(m.normalized, pos) + ": " + msg);
  };
  m.body = jinja::parse(jinja::lex(m.normalized, fail), m.limits.max_depth, fail);
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  jinja::Renderer r(*impl_, context);
  return r.run();
}

const std::string& ChatTemplate::source() const { return impl_->source; }

// ---- ChatFormat --------------------------------------------------------------------------------

ChatFormat ChatFormat::chatml() {
  ChatFormat f;
  f.origin = "chatml (built-in default)";
  f.stop = {kChatmlEndOfTurn};
  return f;
}

std::string ChatFormat::render(const nlohmann::ordered_json& messages, bool add_generation_prompt) const {
  if (!tmpl) {
    std::string out;
    for (const Json& m : messages) out += chatml_turn(m.value("role", std::string()), m.value("content", std::string()));
    if (add_generation_prompt) out += kChatmlGenerationPrompt;
    return out;
  }
  Json ctx = special_tokens.is_object() ? special_tokens : Json::object();
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = add_generation_prompt;
  ctx["tools"] = nullptr;
  ctx["documents"] = nullptr;
  return tmpl->render(ctx);
}

namespace {

// U+E000..U+E003 (private use) in UTF-8.
constexpr const char* kOpenA = "\xEE\x80\x80";
constexpr const char* kOpenB = "\xEE\x80\x81";
constexpr const char* kCloseA = "\xEE\x80\x82";
constexpr const char* kCloseB = "\xEE\x80\x83";

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

}  // namespace

ContentMarkers::ContentMarkers() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char nonce[40];
  std::snprintf(nonce, sizeof nonce, "%016llx%016llx", static_cast<unsigned long long>(rng()),
                static_cast<unsigned long long>(rng()));
  open_ = std::string(kOpenA) + nonce + kOpenB;
  close_ = std::string(kCloseA) + nonce + kCloseB;
}

std::string ContentMarkers::wrap(const std::string& c) const {
  size_t b = 0, e = c.size();
  while (b < e && is_space(c[b])) ++b;
  while (e > b && is_space(c[e - 1])) --e;
  if (b == e) return c;  // whitespace alone cannot spell a control token
  return c.substr(0, b) + open_ + c.substr(b, e - b) + close_ + c.substr(e);
}

std::vector<TextRange> ContentMarkers::strip(std::string& text) const {
  std::vector<TextRange> ranges;
  if (text.find(open_) == std::string::npos && text.find(close_) == std::string::npos) return ranges;
  std::string out;
  out.reserve(text.size());
  size_t at = 0;
  const auto unpaired = [] {
    throw ChatTemplateError(
        "the chat template cuts message content apart (e.g. splits or slices it), so the server cannot keep the "
        "content's text apart from the template's control tokens");
  };
  while (true) {
    const size_t o = text.find(open_, at);
    const size_t stray = text.find(close_, at);
    if (o == std::string::npos) {
      if (stray != std::string::npos) unpaired();
      out.append(text, at, std::string::npos);
      break;
    }
    const size_t c = text.find(close_, o + open_.size());
    if (c == std::string::npos || stray < o || text.find(open_, o + open_.size()) < c) unpaired();
    out.append(text, at, o - at);
    const size_t begin = out.size();
    out.append(text, o + open_.size(), c - o - open_.size());
    if (out.size() > begin) ranges.push_back({begin, out.size()});
    at = c + close_.size();
  }
  text = std::move(out);
  return ranges;
}

ChatFormat make_chat_format(const std::string& source, const std::string& origin, nlohmann::ordered_json special_tokens) {
  ChatFormat f;
  f.tmpl = std::make_shared<const ChatTemplate>(source, origin);
  f.origin = origin;
  f.special_tokens = std::move(special_tokens);
  // The model's end of turn: generation stops at the tokenizer's EOS token (the engine's rule), and
  // at the end-of-turn markers of the well-known template families when the template writes them
  // (their generation_config.json lists them as EOS ids too).
  for (const char* marker : {"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"})
    if (source.find(marker) != std::string::npos) f.stop.emplace_back(marker);
  return f;
}

namespace {

std::string read_text_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw Error("cannot read " + p.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>", ...}.
std::optional<std::string> token_text(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

ChatFormat load_chat_format(const std::filesystem::path& dir, const std::string& override_file) {
  Json tc = Json::object();
  if (std::filesystem::exists(dir / "tokenizer_config.json")) {
    tc = Json::parse(read_text_file(dir / "tokenizer_config.json"), nullptr, /*allow_exceptions=*/false);
    if (!tc.is_object()) throw Error((dir / "tokenizer_config.json").string() + " is not a JSON object");
  }
  // transformers passes every named special token it knows to the template.
  Json special = Json::object();
  Json stm = Json::object();
  if (std::filesystem::exists(dir / "special_tokens_map.json"))
    stm = Json::parse(read_text_file(dir / "special_tokens_map.json"), nullptr, false);
  for (const char* k : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
    std::optional<std::string> t;
    if (tc.contains(k)) t = token_text(tc[k]);
    if (!t && stm.is_object() && stm.contains(k)) t = token_text(stm[k]);
    if (t) special[k] = *t;
  }

  if (!override_file.empty()) return make_chat_format(read_text_file(override_file), override_file, special);
  if (std::filesystem::exists(dir / "chat_template.jinja"))
    return make_chat_format(read_text_file(dir / "chat_template.jinja"), "chat_template.jinja", special);
  if (tc.contains("chat_template")) {
    const Json& ct = tc["chat_template"];
    const std::string where = "tokenizer_config.json chat_template";
    if (ct.is_string()) return make_chat_format(ct.get<std::string>(), where, special);
    if (ct.is_array()) {
      for (const Json& entry : ct)
        if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") && entry["template"].is_string())
          return make_chat_format(entry["template"].get<std::string>(), where + " 'default'", special);
      throw Error((dir / "tokenizer_config.json").string() +
                  ": chat_template lists several templates and none is named \"default\"; pass --chat-template FILE");
    }
    if (!ct.is_null()) throw Error((dir / "tokenizer_config.json").string() + ": chat_template must be a string or a list");
  }
  return ChatFormat::chatml();
}

}  // namespace fineserve
