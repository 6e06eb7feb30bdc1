#include "server/tool_calls.h"

#include <algorithm>

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
  json a = json::object();
  if (args) {
    a = *args;
    if (a.is_string()) a = json::parse(a.get<std::string>(), nullptr, false);
    if (!a.is_object()) return false;
  }
  out.name = j["name"].get<std::string>();
  out.arguments = a.dump();
  return true;
}

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
  out.insert(out.end(), calls.begin(), calls.end());
  return true;
}

// Length of the longest suffix of `text` that is a proper prefix of `marker`.
size_t partial_marker(std::string_view text, std::string_view marker) {
  for (size_t len = std::min(text.size(), marker.size() - 1); len > 0; --len)
    if (text.substr(text.size() - len) == marker.substr(0, len)) return len;
  return 0;
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

std::string ToolCallStream::feed(std::string_view piece) {
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

ToolCallStream::End ToolCallStream::finish() {
  End end;
  const std::string rest = all_.substr(sent_);
  sent_ = all_.size();
  ParsedToolCalls parsed = parse_tool_calls(rest, format_, id_prefix_);
  if (parsed.calls.empty()) {
    end.content = rest;
    return end;
  }
  end.has_calls = true;
  end.content = parsed.content;
  for (size_t i = 0; i < parsed.calls.size(); ++i) end.deltas.push_back(tool_call_delta(parsed.calls[i], static_cast<int>(i)));
  return end;
}

}  // namespace fineserve
