#include "server/tool_calls.h"

#include <algorithm>
#include <optional>

namespace fineserve {

namespace {

using json = nlohmann::json;

constexpr std::string_view kHermesOpen = "<tool_call>";
constexpr std::string_view kHermesClose = "</tool_call>";
constexpr std::string_view kPythonTag = "<|python_tag|>";
constexpr std::string_view kMistralTag = "[TOOL_CALLS]";

std::string_view trim(std::string_view s) {
  const auto ws = [](char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; };
  while (!s.empty() && ws(s.front())) s.remove_prefix(1);
  while (!s.empty() && ws(s.back())) s.remove_suffix(1);
  return s;
}

// {"name": ..., "arguments" | "parameters": {...} or a JSON string of an object} -> a call.
bool call_from_json(const json& j, ToolCall& out) {
  if (!j.is_object() || !j.contains("name") || !j["name"].is_string()) return false;
  const json* args = j.contains("arguments") ? &j["arguments"] : j.contains("parameters") ? &j["parameters"] : nullptr;
  out.arguments = "{}";
  if (args) {
    // An object, or a JSON string holding one (then the string is the arguments text).
    const json a = args->is_string() ? json::parse(args->get<std::string>(), nullptr, false) : *args;
    if (!a.is_object()) return false;
    out.arguments = args->is_string() ? args->get<std::string>() : a.dump();  // the dump: see keep_raw_arguments
  }
  out.name = j["name"].get<std::string>();
  return true;
}

void keep_raw_arguments(std::string_view text, std::vector<ToolCall>& calls, size_t first);

// A JSON object or an array of them -> calls; false when anything does not fit.
bool calls_from_text(std::string_view text, std::vector<ToolCall>& out) {
  const json j = json::parse(text.begin(), text.end(), nullptr, false);
  if (j.is_discarded()) return false;
  std::vector<ToolCall> calls;
  if (j.is_array()) {
    if (j.empty()) return false;
    for (const json& e : j) {
      ToolCall c;
      if (!call_from_json(e, c)) return false;
      calls.push_back(std::move(c));
    }
  } else {
    ToolCall c;
    if (!call_from_json(j, c)) return false;
    calls.push_back(std::move(c));
  }
  const size_t first = out.size();
  out.insert(out.end(), calls.begin(), calls.end());
  keep_raw_arguments(text, out, first);
  return true;
}

// Length of the longest suffix of `text` that is a proper prefix of `marker`.
size_t partial_marker(std::string_view text, std::string_view marker) {
  for (size_t len = std::min(text.size(), marker.size() - 1); len > 0; --len)
    if (text.substr(text.size() - len) == marker.substr(0, len)) return len;
  return 0;
}

// ---- A scanner for call objects that may still be growing ------------------------------------
// Streaming needs to know, from a prefix of the reply, which calls have begun, whether a call's
// name is complete, and where its arguments object starts (and ends, once it has). The scanner
// reads a sequence of call objects (separated by whitespace, ',' or ';', optionally inside
// '[...]'), tolerating an unfinished last one; it does not validate JSON (the whole call is
// parsed by nlohmann::json when it is complete).

constexpr size_t npos = std::string_view::npos;

bool is_ws(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// The end (one past the closing quote) of the string literal at text[p] == '"', or npos.
size_t string_end(std::string_view text, size_t p) {
  for (size_t i = p + 1; i < text.size(); ++i) {
    if (text[i] == '\\') ++i;
    else if (text[i] == '"') return i + 1;
  }
  return npos;
}

// The end of the JSON value starting at text[p], or npos when it is not complete yet (a number or
// literal counts as complete only once a delimiter follows it).
size_t value_end(std::string_view text, size_t p) {
  if (text[p] == '"') return string_end(text, p);
  if (text[p] == '{' || text[p] == '[') {
    int depth = 0;
    for (size_t i = p; i < text.size(); ++i) {
      const char c = text[i];
      if (c == '"') {
        i = string_end(text, i);
        if (i == npos) return npos;
        --i;
      } else if (c == '{' || c == '[') {
        ++depth;
      } else if ((c == '}' || c == ']') && --depth == 0) {
        return i + 1;
      }
    }
    return npos;
  }
  for (size_t i = p; i < text.size(); ++i)
    if (is_ws(text[i]) || text[i] == ',' || text[i] == '}' || text[i] == ']') return i;
  return npos;
}

struct ScannedCall {
  std::optional<std::string> name;  // once its string is complete
  size_t args_begin = npos;         // the arguments object's first byte ('{'), when it has begun
  size_t args_end = npos;           // one past its '}', once complete
  size_t end = npos;                // one past the call object's '}', once complete
};

// The object at text[p] == '{', as far as it goes.
ScannedCall scan_call(std::string_view text, size_t p) {
  ScannedCall call;
  size_t i = p + 1;
  while (true) {
    while (i < text.size() && (is_ws(text[i]) || text[i] == ',')) ++i;
    if (i >= text.size()) return call;
    if (text[i] == '}') {
      call.end = i + 1;
      return call;
    }
    if (text[i] != '"') return call;  // not JSON: never completes
    const size_t key_end = string_end(text, i);
    if (key_end == npos) return call;
    const std::string_view key = text.substr(i + 1, key_end - i - 2);
    i = key_end;
    while (i < text.size() && is_ws(text[i])) ++i;
    if (i >= text.size() || text[i] != ':') return call;
    ++i;
    while (i < text.size() && is_ws(text[i])) ++i;
    if (i >= text.size()) return call;
    const size_t v = i, v_end = value_end(text, v);
    if (key == "arguments" || key == "parameters") {
      if (text[v] == '{') call.args_begin = v, call.args_end = v_end;
    } else if (key == "name" && text[v] == '"' && v_end != npos) {
      const std::string_view literal = text.substr(v, v_end - v);
      const json name = json::parse(literal.begin(), literal.end(), nullptr, false);
      if (name.is_string()) call.name = name.get<std::string>();
    }
    if (v_end == npos) return call;
    i = v_end;
  }
}

// The call objects of text[from, to), in order; offsets are into `text`.
std::vector<ScannedCall> scan_calls(std::string_view text, size_t from, size_t to) {
  std::vector<ScannedCall> calls;
  const std::string_view part = text.substr(0, to);
  size_t i = from;
  while (true) {
    while (i < part.size() && (is_ws(part[i]) || part[i] == ',' || part[i] == ';' || part[i] == '[')) ++i;
    if (i >= part.size() || part[i] != '{') return calls;
    calls.push_back(scan_call(part, i));
    if (calls.back().end == npos) return calls;
    i = calls.back().end;
  }
}

// The arguments text OpenAI's `arguments` carries: the object exactly as the model wrote it, so that
// streamed fragments (cut from the same bytes) add up to it.
void keep_raw_arguments(std::string_view text, std::vector<ToolCall>& calls, size_t first) {
  const std::vector<ScannedCall> scanned = scan_calls(text, 0, text.size());
  if (scanned.size() != calls.size() - first) return;
  for (size_t i = 0; i < scanned.size(); ++i)
    if (scanned[i].args_begin != npos && scanned[i].args_end != npos)
      calls[first + i].arguments = std::string(text.substr(scanned[i].args_begin, scanned[i].args_end - scanned[i].args_begin));
}

}  // namespace

std::string_view tool_call_format_name(ToolCallFormat f) {
  switch (f) {
    case ToolCallFormat::Hermes: return "hermes";
    case ToolCallFormat::Llama3: return "llama3_json";
    case ToolCallFormat::Mistral: return "mistral";
  }
  return "hermes";
}

ToolCallFormat detect_tool_call_format(std::string_view source) {
  if (source.find(kMistralTag) != std::string_view::npos) return ToolCallFormat::Mistral;
  if (source.find(kHermesOpen) != std::string_view::npos) return ToolCallFormat::Hermes;
  if (source.find(kPythonTag) != std::string_view::npos || source.find("<|eot_id|>") != std::string_view::npos)
    return ToolCallFormat::Llama3;
  return ToolCallFormat::Hermes;
}

ParsedToolCalls parse_tool_calls(std::string_view text, ToolCallFormat format, const std::string& id_prefix) {
  ParsedToolCalls out;
  switch (format) {
    case ToolCallFormat::Hermes: {
      std::string content;
      size_t pos = 0;
      while (pos < text.size()) {
        const size_t open = text.find(kHermesOpen, pos);
        if (open == std::string_view::npos) {
          content += text.substr(pos);
          break;
        }
        content += text.substr(pos, open - pos);
        const size_t body = open + kHermesOpen.size();
        size_t close = text.find(kHermesClose, body);
        const size_t end = close == std::string_view::npos ? text.size() : close + kHermesClose.size();
        if (close == std::string_view::npos) close = text.size();
        if (!calls_from_text(trim(text.substr(body, close - body)), out.calls)) content += text.substr(open, end - open);
        pos = end;
      }
      out.content = std::string(trim(content));
      break;
    }
    case ToolCallFormat::Llama3:
    case ToolCallFormat::Mistral: {
      std::string_view t = trim(text);
      const std::string_view tag = format == ToolCallFormat::Llama3 ? kPythonTag : kMistralTag;
      if (t.starts_with(tag)) t = trim(t.substr(tag.size()));
      bool ok = calls_from_text(t, out.calls);
      if (!ok && format == ToolCallFormat::Llama3) {
        // Several calls separated by ';' (Llama 3.1's multi-call form): every part must parse.
        std::vector<ToolCall> calls;
        size_t pos = 0;
        ok = true;
        while (ok && pos <= t.size()) {
          size_t semi = t.find(';', pos);
          // Grow the part until it parses: a ';' may sit inside a string.
          while (true) {
            const size_t end = semi == std::string_view::npos ? t.size() : semi;
            std::vector<ToolCall> one;
            if (calls_from_text(trim(t.substr(pos, end - pos)), one)) {
              calls.insert(calls.end(), one.begin(), one.end());
              pos = end + 1;
              break;
            }
            if (semi == std::string_view::npos) {
              ok = false;
              break;
            }
            semi = t.find(';', semi + 1);
          }
          if (semi == std::string_view::npos) break;
        }
        if (ok && calls.size() > 1) out.calls = std::move(calls);
        else ok = false;
      }
      if (!ok) {
        out.calls.clear();
        out.content = std::string(trim(text));
      }
      break;
    }
  }
  for (size_t i = 0; i < out.calls.size(); ++i) out.calls[i].id = id_prefix + std::to_string(i);
  return out;
}

json tool_call_json(const ToolCall& call) {
  return {{"id", call.id}, {"type", "function"}, {"function", {{"name", call.name}, {"arguments", call.arguments}}}};
}

json tool_call_delta(const ToolCall& call, int index) {
  json c = tool_call_json(call);
  c["index"] = index;
  return {{"tool_calls", json::array({c})}};
}

bool apply_tool_calls(json& message, std::string_view text, ToolCallFormat format, const std::string& id_prefix) {
  ParsedToolCalls parsed = parse_tool_calls(text, format, id_prefix);
  if (parsed.calls.empty()) return false;
  message["content"] = parsed.content.empty() ? json(nullptr) : json(parsed.content);
  message["tool_calls"] = json::array();
  for (const ToolCall& c : parsed.calls) message["tool_calls"].push_back(tool_call_json(c));
  return true;
}

ToolCallStream::ToolCallStream(ToolCallFormat format, std::string id_prefix)
    : format_(format), id_prefix_(std::move(id_prefix)) {}

ToolCallStream::Update ToolCallStream::feed(std::string_view piece, bool last) {
  Update u;
  u.content = take_content(piece);
  if (holding_) stream_calls(u);
  if (last) finish(u);
  return u;
}

std::string ToolCallStream::take_content(std::string_view piece) {
  all_ += piece;
  if (holding_) return {};
  size_t limit = all_.size();
  if (format_ == ToolCallFormat::Hermes) {
    const size_t open = all_.find(kHermesOpen, sent_);
    if (open != std::string::npos) {
      holding_ = true;
      held_from_ = open;
      limit = open;
    } else {
      limit -= partial_marker(all_, kHermesOpen);
    }
  } else if (sent_ == 0) {
    // JSON-only formats: a reply that starts like a call is held whole until it ends.
    const std::string_view t = trim(all_);
    const std::string_view tag = format_ == ToolCallFormat::Llama3 ? kPythonTag : kMistralTag;
    const char opener = format_ == ToolCallFormat::Llama3 ? '{' : '[';
    if (t.empty() || (t.size() < tag.size() && tag.starts_with(t))) return {};  // undecided yet
    if (t.front() == opener || t.starts_with(tag)) {
      holding_ = true;
      held_from_ = 0;
      return {};
    }
  }
  std::string out = all_.substr(sent_, limit - sent_);
  sent_ = limit;
  return out;
}

void ToolCallStream::stream_calls(Update& u) {
  const std::string_view text = all_;
  std::vector<ScannedCall> calls;
  if (format_ == ToolCallFormat::Hermes) {
    // The calls inside each <tool_call> ... </tool_call> (the last one possibly still open).
    for (size_t open = text.find(kHermesOpen, held_from_); open != npos; open = text.find(kHermesOpen, open + 1)) {
      const size_t body = open + kHermesOpen.size();
      const size_t close = std::min(text.find(kHermesClose, body), text.size());
      for (ScannedCall& c : scan_calls(text, body, close)) calls.push_back(std::move(c));
    }
  } else {
    size_t from = held_from_;
    while (from < text.size() && is_ws(text[from])) ++from;
    const std::string_view tag = format_ == ToolCallFormat::Llama3 ? kPythonTag : kMistralTag;
    if (text.substr(from).starts_with(tag)) from += tag.size();
    calls = scan_calls(text, from, text.size());
  }
  for (size_t k = 0; k < calls.size(); ++k) {
    const ScannedCall& c = calls[k];
    if (k == streamed_.size()) {
      if (!c.name) break;  // calls are announced in order, each once its name is complete
      streamed_.push_back({});
      const ToolCall announced{id_prefix_ + std::to_string(k), *c.name, ""};
      u.deltas.push_back(tool_call_delta(announced, static_cast<int>(k)));
    }
    if (c.args_begin == npos) continue;
    // Every byte from the arguments' '{' on belongs to them until their '}' arrives.
    const size_t avail = (c.args_end != npos ? c.args_end : text.size()) - c.args_begin;
    std::string& sent = streamed_[k].arguments;
    if (avail > sent.size()) {
      const std::string more(text.substr(c.args_begin + sent.size(), avail - sent.size()));
      sent += more;
      u.deltas.push_back(arguments_delta(static_cast<int>(k), more));
    }
  }
}

json ToolCallStream::arguments_delta(int index, const std::string& fragment) {
  return {{"tool_calls", json::array({{{"index", index}, {"function", {{"arguments", fragment}}}}})}};
}

void ToolCallStream::finish(Update& u) {
  const std::string rest = all_.substr(sent_);
  sent_ = all_.size();
  const ParsedToolCalls parsed = parse_tool_calls(rest, format_, id_prefix_);
  u.has_calls = !parsed.calls.empty() || !streamed_.empty();
  if (parsed.calls.empty()) {
    // A call that began but never parsed (cut short, invalid JSON) is text, as in a whole reply.
    u.content += rest;
    return;
  }
  u.content += parsed.content;
  for (size_t i = 0; i < parsed.calls.size(); ++i) {
    const ToolCall& call = parsed.calls[i];
    if (i >= streamed_.size()) {
      u.deltas.push_back(tool_call_delta(call, static_cast<int>(i)));
      continue;
    }
    // Announced already: the rest of its arguments (all of them when they were a JSON string).
    const std::string& sent = streamed_[i].arguments;
    if (call.arguments.size() > sent.size() && call.arguments.starts_with(sent))
      u.deltas.push_back(arguments_delta(static_cast<int>(i), call.arguments.substr(sent.size())));
  }
}

}  // namespace fineserve
