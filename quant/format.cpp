#include "quant/format.h"

#include <algorithm>
#include <charconv>
#include <vector>

#include "kernels/base.h"

namespace fineserve::quant {
namespace {

// A metadata entry holding a JSON object of integers ({stem: value}), or an error naming it.
nlohmann::json json_object_entry(const ckpt::Metadata& header, const char* key, const std::string& where) {
  const auto it = header.find(key);
  if (it == header.end()) return nlohmann::json::object();
  const nlohmann::json j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw Error(where + ": metadata '" + key + "' is not valid JSON");
  if (!j.is_object()) throw Error(where + ": metadata '" + key + "' is not a JSON object");
  return j;
}

}  // namespace

bool FormatMetadata::mixed_bits() const {
  for (const auto& [stem, b] : matrix_bits)
    if (b != bits) return true;
  return false;
}

std::string FormatMetadata::source_format_summary() const {
  std::map<std::string, size_t> count;
  for (const auto& [stem, g] : groups) ++count[source_format_of(stem)];
  for (const auto& [stem, f] : source_formats)
    if (!groups.count(stem)) ++count[f];
  if (count.empty()) return kFineQuantSource;
  std::vector<std::pair<size_t, std::string>> order;
  for (const auto& [f, n] : count) order.emplace_back(n, f);
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::string out;
  for (const auto& [n, f] : order) out += (out.empty() ? "" : ",") + f;
  return out;
}

std::string FormatMetadata::quantization_name() const {
  std::string name = "finequant-int" + std::to_string(bits);
  if (expert_bits && expert_bits != bits) name += ",experts-int" + std::to_string(expert_bits);
  return name;
}

ckpt::Metadata to_header_metadata(const FormatMetadata& m) {
  nlohmann::json groups = nlohmann::json::object();
  for (const auto& [stem, g] : m.groups) groups[stem] = g;
  ckpt::Metadata out{{"format", kFormatName},
                     {"format_version", std::to_string(kFormatVersion)},
                     {"quantizer_version", std::to_string(kQuantizerVersion)},
                     {"bits", std::to_string(m.bits)},
                     {"group_mode", m.group_mode},
                     {"alpha", std::to_string(m.alpha)},
                     {"source_fingerprint", m.source_fingerprint},
                     {"groups", groups.dump()}};
  if (!m.scale_rule.empty()) out["scale_rule"] = m.scale_rule;
  if (m.target_bits > 0) out["target_bits"] = std::to_string(m.target_bits);
  if (m.mixed_bits()) {
    if (m.expert_bits) out["expert_bits"] = std::to_string(m.expert_bits);  // 0: not split by experts (GGUF)
    out["matrix_bits"] = nlohmann::json(m.matrix_bits).dump();
  }
  if (!m.source_formats.empty()) out["source_formats"] = nlohmann::json(m.source_formats).dump();
  for (const auto& [k, v] : m.extra) out[k] = v;
  return out;
}

nlohmann::json to_quantization_config(const FormatMetadata& m) {
  nlohmann::json groups = nlohmann::json::object();
  for (const auto& [stem, g] : m.groups) groups[stem] = g;
  nlohmann::json out = {{"quant_method", "finequant"},
                        {"format", kFormatName},
                        {"format_version", kFormatVersion},
                        {"quantizer_version", kQuantizerVersion},
                        {"bits", m.bits},
                        {"group_mode", m.group_mode},
                        {"groups", groups},
                        {"source_fingerprint", m.source_fingerprint}};
  if (m.mixed_bits()) {
    if (m.expert_bits) out["expert_bits"] = m.expert_bits;
    out["matrix_bits"] = nlohmann::json(m.matrix_bits);
  }
  if (!m.source_formats.empty()) out["source_formats"] = nlohmann::json(m.source_formats);
  return out;
}

bool is_finequant(const ckpt::Metadata& header) {
  const auto it = header.find("format");
  return it != header.end() && it->second == kFormatName;
}

std::optional<FormatMetadata> read_header_metadata(const ckpt::Metadata& header, const std::string& where) {
  if (!is_finequant(header)) return std::nullopt;
  FormatMetadata m;
  if (auto it = header.find("format_version"); it != header.end()) {
    int version = 0;
    const auto [end, ec] = std::from_chars(it->second.data(), it->second.data() + it->second.size(), version);
    if (ec != std::errc() || end != it->second.data() + it->second.size() || version < 1)
      throw Error(where + ": metadata 'format_version' is '" + it->second + "' (a positive integer expected)");
    if (version > kFormatVersion)
      throw Error(where + ": FineQuant format version " + it->second + " is newer than this FineServe reads (" +
                  std::to_string(kFormatVersion) + "): upgrade FineServe");
  }
  const auto b = header.find("bits");
  if (b == header.end() || (b->second != "8" && b->second != "4"))
    throw Error(where + ": FineQuant metadata has no valid 'bits'");
  m.bits = std::stoi(b->second);
  if (auto it = header.find("group_mode"); it != header.end()) m.group_mode = it->second;
  if (auto it = header.find("source_fingerprint"); it != header.end()) m.source_fingerprint = it->second;
  if (auto it = header.find("alpha"); it != header.end()) m.alpha = std::strtod(it->second.c_str(), nullptr);
  if (auto it = header.find("scale_rule"); it != header.end()) m.scale_rule = it->second;
  if (auto it = header.find("target_bits"); it != header.end()) m.target_bits = std::strtod(it->second.c_str(), nullptr);
  if (auto it = header.find("expert_bits"); it != header.end()) {
    if (it->second != "8" && it->second != "4")
      throw Error(where + ": metadata 'expert_bits' is '" + it->second + "' (8 or 4 expected)");
    m.expert_bits = std::stoi(it->second);
  }
  const nlohmann::json matrix_bits = json_object_entry(header, "matrix_bits", where);  // quantize --expert-bits
  for (const auto& [stem, v] : matrix_bits.items()) {
    if (!v.is_number_integer() || !is_valid_bits(v.get<int>()))
      throw Error(where + ": metadata 'matrix_bits' gives " + stem + " " + v.dump() + " bits (8 or 4 expected)");
    m.matrix_bits[stem] = v.get<int>();
  }
  const nlohmann::json groups = json_object_entry(header, "groups", where);
  for (const auto& [stem, v] : groups.items()) {
    if (!v.is_number_integer() || v.get<int64_t>() <= 0)
      throw Error(where + ": metadata 'groups' gives " + stem + " the group " + v.dump() + " (a positive integer expected)");
    m.groups[stem] = v.get<int64_t>();
  }
  const nlohmann::json sources = json_object_entry(header, "source_formats", where);
  for (const auto& [stem, v] : sources.items()) {
    if (!v.is_string() || v.get<std::string>().empty())
      throw Error(where + ": metadata 'source_formats' gives " + stem + " " + v.dump() + " (a format name expected)");
    m.source_formats[stem] = v.get<std::string>();
  }
  return m;
}

}  // namespace fineserve::quant
