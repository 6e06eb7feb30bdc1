#include "quant/convert.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "kernels/base.h"
#include "kernels/cpu/convert.h"
#include "models/checkpoint/atomic_dir.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "quant/bit_budget.h"

namespace fineserve::quant {
namespace fs = std::filesystem;
namespace {

struct Plan {
  const ckpt::TensorInfo* info = nullptr;
  const ckpt::SafetensorsFile* file = nullptr;
  bool quantize = false;
  int bits = 0;          // when quantize
  std::string why_kept;  // when !quantize
  int64_t group = 0;     // > 0: chosen by the bit budget (with bits)
  std::string budget_reason;
};

std::string stem_of(const std::string& weight_name) {  // "x.fc1.weight" -> "x.fc1"
  return weight_name.substr(0, weight_name.size() - std::string(".weight").size());
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string mode_name(GroupMode m) { return group_mode_name(m); }

// The importances ConvertOptions holds for this weight ([K]), or null; throws for a wrong length or
// a negative / non-finite value (a corrupt or mismatched calibration).
const float* importance_for(const ConvertOptions& o, const std::string& name, int64_t cols) {
  const auto it = o.importance.find(name);
  if (it == o.importance.end()) return nullptr;
  if (static_cast<int64_t>(it->second.size()) != cols)
    throw Error("calibration: " + name + " has " + std::to_string(it->second.size()) + " input importances, K is " +
                std::to_string(cols));
  for (const float v : it->second)
    if (!(v >= 0) || !std::isfinite(v)) throw Error("calibration: " + name + " has a negative or non-finite importance");
  return it->second.data();
}

// --target-bits: every planned matrix's bits and group from the bit budget (quant/bit_budget.h).
void allocate_budget(std::vector<Plan>& plan, const ConvertOptions& o) {
  std::vector<BudgetMatrix> matrices;
  std::vector<Plan*> planned;
  for (Plan& p : plan) {
    if (!p.quantize) continue;
    const ckpt::TensorView v = p.file->view(*p.info);
    const MatrixView m{v.data, p.info->dtype, p.info->shape[0], p.info->shape[1]};
    BudgetMatrix bm{p.info->name, m.rows * m.cols, salience_of(p.info->name, o.salience), {}};
    const float* importance = importance_for(o, p.info->name, m.cols);
    for (const int bits : {8, 4}) {
      if (bits == 4 && m.cols % 2 != 0) continue;
      for (const GroupLevel& l : error_levels(m, bits, o.group.scale, importance))
        bm.options.push_back({bits, l.group, bits + 16.0 / static_cast<double>(l.group), l.rel_error});
    }
    p.file->release(*p.info);
    matrices.push_back(std::move(bm));
    planned.push_back(&p);
  }
  const BudgetAllocation a = allocate_bits(matrices, o.target_bits);
  if (!a.feasible) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "--target-bits %.3f is below the cheapest allocation (%.3f bits per weight)",
                  o.target_bits, a.bits_per_weight);
    throw Error(buf);
  }
  for (size_t i = 0; i < planned.size(); ++i) {
    const BudgetOption& c = matrices[i].options[a.choice[i]];
    planned[i]->bits = c.bits;
    planned[i]->group = c.group;
    char buf[200];
    std::snprintf(buf, sizeof buf, "bit budget %.3f (model %.3f): int%d, rel error %.4f at %.3f bits/weight, salience %g",
                  o.target_bits, a.bits_per_weight, c.bits, c.rel_error, c.bits_per_weight, matrices[i].salience);
    planned[i]->budget_reason = buf;
  }
}

// Asks the kernel to start reading a tensor's pages while the previous one is being quantized.
void prefetch(const ckpt::SafetensorsFile& file, const ckpt::TensorInfo& t) {
  const ckpt::TensorView v = file.view(t);
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  auto begin = reinterpret_cast<uintptr_t>(v.data) & ~(page - 1);
  auto end = reinterpret_cast<uintptr_t>(v.data) + v.nbytes();
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_WILLNEED);
}

std::span<const std::byte> as_bytes_of(const auto& vec) { return std::as_bytes(std::span(vec)); }

uint64_t fnv1a(uint64_t h, std::string_view bytes) {
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

std::vector<std::string> default_keep_patterns() {
  return {"embed", "lm_head", "norm", "\\.gate\\.weight$", "router"};
}

std::vector<std::string> keep_patterns_quantizing_embeddings() {
  std::vector<std::string> keep = default_keep_patterns();
  std::erase_if(keep, [](const std::string& p) { return p == "embed" || p == "lm_head"; });
  keep.push_back("embed_positions");  // OPT's learned positions: added, not looked up by token
  return keep;
}

std::string source_fingerprint(const fs::path& model) {
  const ckpt::Checkpoint src = ckpt::Checkpoint::open(model);
  uint64_t h = 1469598103934665603ull;
  std::ifstream cfg(src.dir() / "config.json", std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(cfg)), std::istreambuf_iterator<char>());
  h = fnv1a(h, text);
  for (const auto& f : src.files()) {
    h = fnv1a(h, f->header_json());
    h = fnv1a(h, std::to_string(f->file_size()));
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "fnv1a64:%016llx", static_cast<unsigned long long>(h));
  return buf;
}

ConvertReport convert_checkpoint(const ConvertOptions& o, const std::function<void(const Progress&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  const int bits = o.group.bits;
  if (!is_valid_bits(bits)) throw Error("--bits must be 8 or 4 (got " + std::to_string(bits) + ")");
  if (o.expert_bits != 0 && !is_valid_bits(o.expert_bits))
    throw Error("--expert-bits must be 8 or 4 (got " + std::to_string(o.expert_bits) + ")");
  const std::regex expert_re(kExpertPattern), router_re(kRouterPattern);
  if (o.group.mode == GroupMode::Alpha && o.group.alpha != 0 && !(o.group.alpha > 1.0))
    throw Error("--alpha must be > 1 (the ratio of mean group ranges before and after halving)");
  if (o.group.mode == GroupMode::MaxRelError && !(o.group.max_rel_error > 0 && o.group.max_rel_error < 1))
    throw Error("--max-rel-error must be in (0, 1)");

  const ckpt::Checkpoint src = ckpt::Checkpoint::open(o.model);
  if (!fs::exists(src.dir() / "config.json")) throw Error("no config.json in " + src.dir().string());
  nlohmann::json config = ckpt::read_json_file(src.dir() / "config.json");
  if (config.contains("quantization_config"))
    throw Error(o.model.string() + " is already quantized (config.json has quantization_config)");

  std::vector<std::regex> keep;
  for (const auto& p : o.keep) {
    try {
      keep.emplace_back(p);
    } catch (const std::regex_error& e) {
      throw Error("invalid --keep pattern '" + p + "': " + e.what());
    }
  }

  // Plan every tensor first, so that a matrix the options cannot handle (a fixed group that does
  // not divide its K) fails before anything is written.
  std::vector<Plan> plan;
  for (const auto& file : src.files()) {
    for (const ckpt::TensorInfo& t : file->tensors()) {
      Plan p{&t, file.get(), false, bits, "", 0, ""};
      if (o.expert_bits && std::regex_search(t.name, expert_re)) p.bits = o.expert_bits;
      const bool matrix = t.shape.size() == 2 && is_float(t.dtype) && ends_with(t.name, ".weight");
      const bool kept = std::any_of(keep.begin(), keep.end(), [&](const std::regex& r) { return std::regex_search(t.name, r); });
      if (!matrix) {
        p.why_kept = t.shape.size() == 2 ? "not a float .weight" : "not a matrix";
      } else if (std::regex_search(t.name, router_re)) {
        p.why_kept = "MoE router (always 16-bit)";
      } else if (kept) {
        p.why_kept = "matches --keep";
      } else if (p.bits == 4 && t.shape[1] % 2 != 0) {
        p.why_kept = "odd K cannot be packed as int4";
      } else if (t.shape[0] == 0 || t.shape[1] == 0) {
        p.why_kept = "empty";
      } else {
        p.quantize = true;
        if (o.group.mode == GroupMode::Fixed && o.group.group != -1 && !is_allowed_group(t.shape[1], o.group.group)) {
          std::string allowed;
          for (int64_t g : allowed_groups(t.shape[1])) allowed += (allowed.empty() ? "" : ", ") + std::to_string(g);
          throw Error("--group " + std::to_string(o.group.group) + " is not allowed for " + t.name + " (K = " +
                      std::to_string(t.shape[1]) + "; allowed: " + allowed + ")");
        }
      }
      plan.push_back(p);
    }
  }

  if (o.target_bits != 0) {
    if (!(o.target_bits >= 4 && o.target_bits <= 8.5))
      throw Error("--target-bits must be between 4 and 8.5 bits per weight (codes + scales)");
    allocate_budget(plan, o);
  }

  ConvertReport report;
  report.source = o.model.string();
  report.fingerprint = source_fingerprint(o.model);
  report.options = o.group;
  report.expert_bits = o.expert_bits;
  report.target_bits = o.target_bits;
  if (o.target_bits > 0) report.salience = o.salience;
  report.calibration = o.calibration;

  // Output names, and the metadata with placeholder groups of the longest value, to size the
  // headers before the groups are known (the bits are known now: they do not depend on the data).
  std::vector<std::string> names;
  FormatMetadata format;
  format.bits = bits;
  format.expert_bits = o.expert_bits;
  // --target-bits mixes bits without --expert-bits: the format writes expert_bits beside matrix_bits
  // whenever bits are mixed, and readers accept only 8 or 4 there, so record the base width (what
  // experts get when nothing else says; matrix_bits names every matrix's bits anyway).
  if (o.target_bits > 0 && o.expert_bits == 0) format.expert_bits = bits;
  format.group_mode = o.target_bits > 0 ? "target-bits" : mode_name(o.group.mode);
  format.scale_rule = scale_rule_name(o.group.scale);
  format.target_bits = o.target_bits;
  format.alpha = o.group.alpha == 0 ? kDefaultAlpha : o.group.alpha;
  format.source_fingerprint = report.fingerprint;
  for (const Plan& p : plan) {
    if (p.quantize) {
      const std::string stem = stem_of(p.info->name);
      names.push_back(codes_name(stem));
      names.push_back(scales_name(stem));
      format.groups[stem] = 99999999999LL;
      format.matrix_bits[stem] = p.bits;
    } else {
      names.push_back(p.info->name);
    }
  }
  ckpt::AtomicDirectory dir(o.out, o.overwrite);
  ckpt::CheckpointWriter writer(dir.path(), names, to_header_metadata(format), o.max_shard_bytes);

  Progress prog;
  prog.tensors_total = plan.size();
  for (const Plan& p : plan) prog.bytes_total += p.info->nbytes();

  std::vector<float> f32;
  std::vector<uint16_t> f16;
  for (size_t i = 0; i < plan.size(); ++i) {
    const Plan& p = plan[i];
    const ckpt::TensorInfo& t = *p.info;
    if (i + 1 < plan.size()) prefetch(*plan[i + 1].file, *plan[i + 1].info);
    prog.current = t.name;
    if (progress) progress(prog);
    const ckpt::TensorView v = p.file->view(t);
    report.bytes_in += t.nbytes();

    if (p.quantize) {
      const MatrixView m{v.data, t.dtype, t.shape[0], t.shape[1]};
      MatrixReport r;
      r.name = t.name;
      r.rows = m.rows;
      r.cols = m.cols;
      r.bits = p.bits;
      GroupOptions group_options = o.group;
      group_options.bits = p.bits;  // an error target is judged at the matrix's own bits
      if (p.group > 0) {  // --target-bits decided
        r.decision.group = p.group;
        r.decision.mode = GroupMode::Fixed;
        r.decision.reason = p.budget_reason;
      } else {
        r.decision = choose_group(m, group_options);
      }
      // The report shows range statistics in every mode; a fixed group does not compute them.
      if (r.decision.levels.empty()) r.decision.levels = range_levels(m);
      const float* importance = importance_for(o, t.name, m.cols);
      const QuantizedMatrix q = quantize(m, p.bits, r.decision.group, o.group.scale, importance);
      r.calibrated = importance != nullptr;
      r.weighted_rel_error = q.weighted_rel_error;
      const std::string stem = stem_of(t.name);
      const MatrixFormat mf{p.bits, q.group};
      writer.add(codes_name(stem), mf.code_dtype(), {m.rows, mf.code_row_bytes(m.cols)}, as_bytes_of(q.codes));
      writer.add(scales_name(stem), DType::F16, {m.rows, mf.groups_per_row(m.cols)}, as_bytes_of(q.scales));
      format.groups[stem] = q.group;
      r.rel_error = q.rel_error;
      r.absmax = r.decision.levels.empty() ? 0 : r.decision.levels.front().max_range;
      r.bits_per_weight = p.bits + 16.0 / static_cast<double>(q.group);
      r.bytes_in = t.nbytes();
      r.bytes_out = q.codes.size() + q.scales.size() * 2;
      report.bytes_out += r.bytes_out;
      report.matrices.push_back(std::move(r));
    } else if (t.dtype == DType::F32) {  // non-quantized tensors stay in 16 bits
      f32.resize(static_cast<size_t>(t.numel()));
      f16.resize(f32.size());
      cpu::to_f32(v.data, DType::F32, t.numel(), f32.data());
      cpu::from_f32(f32.data(), t.numel(), DType::F16, f16.data());
      writer.add(t.name, DType::F16, t.shape, as_bytes_of(f16));
      report.bytes_out += f16.size() * 2;
      report.kept.push_back({t.name, "F16", t.shape, p.why_kept});
    } else {
      writer.add(t.name, t.dtype, t.shape, std::span<const std::byte>(v.data, t.nbytes()));
      report.bytes_out += t.nbytes();
      report.kept.push_back({t.name, std::string(dtype_name(t.dtype)), t.shape, p.why_kept});
    }
    p.file->release(t);
    prog.tensors_done = i + 1;
    prog.bytes_done += t.nbytes();
    if (progress) progress(prog);
  }
  writer.finish(to_header_metadata(format));

  // Everything that is not a safetensors shard (config, tokenizer, generation config) is copied;
  // config.json records how the weights were quantized.
  for (const auto& entry : fs::directory_iterator(src.dir())) {
    const std::string fname = entry.path().filename().string();
    if (!entry.is_regular_file() || entry.path().extension() == ".safetensors" ||
        fname == "model.safetensors.index.json" || fname == "quant_report.json" || fname == "config.json")
      continue;
    fs::copy_file(entry.path(), dir.path() / fname);
  }
  config["quantization_config"] = to_quantization_config(format);
  {
    std::ofstream out(dir.path() / "config.json");
    out << config.dump(2) << "\n";
    if (!out) throw Error("cannot write config.json in " + dir.path().string());
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  {
    std::ofstream out(dir.path() / "quant_report.json");
    out << to_json(report).dump(2) << "\n";
    if (!out) throw Error("cannot write quant_report.json in " + dir.path().string());
  }
  dir.commit();
  return report;
}

namespace {
double quantized_bits_per_weight(const ConvertReport& r) {
  double n = 0, bits = 0;
  for (const MatrixReport& m : r.matrices) {
    const double w = static_cast<double>(m.rows) * static_cast<double>(m.cols);
    n += w;
    bits += w * m.bits_per_weight;
  }
  return n > 0 ? bits / n : 0.0;
}
}  // namespace

nlohmann::json to_json(const ConvertReport& r) {
  nlohmann::json matrices = nlohmann::json::array();
  for (const MatrixReport& m : r.matrices) {
    nlohmann::json levels = nlohmann::json::array();
    for (const GroupLevel& l : m.decision.levels) {
      nlohmann::json j = {{"group", l.group}, {"mean_range", l.mean_range}, {"max_range", l.max_range}, {"ratio", l.ratio}};
      if (l.rel_error >= 0) j["rel_error"] = l.rel_error;
      if (l.gaussian_rel_error >= 0) j["gaussian_rel_error"] = l.gaussian_rel_error;
      levels.push_back(j);
    }
    matrices.push_back({{"name", m.name},
                        {"shape", {m.rows, m.cols}},
                        {"bits", m.bits},
                        {"group", m.decision.group},
                        {"mode", mode_name(m.decision.mode)},
                        {"reason", m.decision.reason},
                        {"target_met", m.decision.target_met},
                        {"levels", levels},
                        {"absmax", m.absmax},
                        {"rel_error", m.rel_error},
                        {"bits_per_weight", m.bits_per_weight},
                        {"calibrated", m.calibrated},
                        {"weighted_rel_error", m.weighted_rel_error},
                        {"bytes_in", m.bytes_in},
                        {"bytes_out", m.bytes_out}});
  }
  nlohmann::json kept = nlohmann::json::array();
  for (const auto& k : r.kept) kept.push_back({{"name", k.name}, {"dtype", k.dtype}, {"shape", k.shape}, {"why", k.why}});
  nlohmann::json opts = {{"bits", r.options.bits},
                         {"mode", mode_name(r.options.mode)},
                         {"scale_rule", scale_rule_name(r.options.scale)}};
  if (r.expert_bits) opts["expert_bits"] = r.expert_bits;
  if (r.target_bits > 0) {
    opts["target_bits"] = r.target_bits;
    nlohmann::json salience = nlohmann::json::object();
    for (const SaliencePrior& p : r.salience) salience[p.pattern] = p.weight;
    opts["salience"] = salience;
  }
  if (!r.calibration.empty()) opts["calibration"] = r.calibration;
  if (r.options.mode == GroupMode::Adaptive) {
    opts["tolerance"] = r.options.tolerance == 0 ? kDefaultTolerance : r.options.tolerance;
    opts["error_cap"] = r.options.error_cap == 0 ? kDefaultErrorCap : r.options.error_cap;
  }
  if (r.options.mode == GroupMode::Alpha) opts["alpha"] = r.options.alpha == 0 ? kDefaultAlpha : r.options.alpha;
  if (r.options.mode == GroupMode::Fixed) opts["group"] = r.options.group;
  if (r.options.mode == GroupMode::MaxRelError) opts["max_rel_error"] = r.options.max_rel_error;
  return {{"format", kFormatName},
          {"quantizer_version", kQuantizerVersion},
          {"source", r.source},
          {"source_fingerprint", r.fingerprint},
          {"options", opts},
          {"matrices", matrices},
          {"kept", kept},
          {"totals",
           {{"bytes_in", r.bytes_in},
            {"bytes_out", r.bytes_out},
            {"compression", r.bytes_out ? static_cast<double>(r.bytes_in) / static_cast<double>(r.bytes_out) : 0.0},
            {"bits_per_weight", quantized_bits_per_weight(r)},
            {"seconds", r.seconds}}}};
}

std::string format_report(const ConvertReport& r) {
  std::ostringstream os;
  char line[512];
  std::snprintf(line, sizeof line, "%-48s %13s %4s %6s %9s %9s %9s %9s %8s\n", "matrix", "shape", "bits", "group",
                "R(K)", "R(group)", "absmax", "rel err", "bits/w");
  os << line;
  for (const MatrixReport& m : r.matrices) {
    const auto& lv = m.decision.levels;
    double r_k = lv.empty() ? 0 : lv.front().mean_range, r_g = r_k;
    for (const GroupLevel& l : lv)
      if (l.group == m.decision.group) r_g = l.mean_range;
    const std::string shape = std::to_string(m.rows) + "x" + std::to_string(m.cols);
    const std::string group = m.decision.group == m.cols ? "K" : std::to_string(m.decision.group);
    std::string name = m.name.size() > 48 ? "..." + m.name.substr(m.name.size() - 45) : m.name;
    std::snprintf(line, sizeof line, "%-48s %13s %4d %6s %9.3g %9.3g %9.3g %9.5f %8.3f%s\n", name.c_str(),
                  shape.c_str(), m.bits, group.c_str(), r_k, r_g, m.absmax, m.rel_error, m.bits_per_weight,
                  m.decision.target_met ? "" : "  (target not met)");
    os << line;
  }
  uint64_t q_in = 0, q_out = 0;
  for (const MatrixReport& m : r.matrices) {
    q_in += m.bytes_in;
    q_out += m.bytes_out;
  }
  const double gb = 1e9;
  const std::string bits_text = "int" + std::to_string(r.options.bits) +
                                (r.expert_bits && r.expert_bits != r.options.bits
                                     ? " (experts int" + std::to_string(r.expert_bits) + ")"
                                     : "");
  std::snprintf(line, sizeof line,
                "\n%zu matrices quantized to %s (%.3f GB -> %.3f GB), %zu tensors kept\n"
                "checkpoint: %.3f GB -> %.3f GB, compression %.2fx, %.1f s (%.2f GB/s of input)\n",
                r.matrices.size(), bits_text.c_str(), static_cast<double>(q_in) / gb, static_cast<double>(q_out) / gb,
                r.kept.size(), static_cast<double>(r.bytes_in) / gb, static_cast<double>(r.bytes_out) / gb,
                r.bytes_out ? static_cast<double>(r.bytes_in) / static_cast<double>(r.bytes_out) : 0.0, r.seconds,
                r.seconds > 0 ? static_cast<double>(r.bytes_in) / gb / r.seconds : 0.0);
  os << line;
  // The mix of bits and groups, weighted by weights: the allocation --target-bits made.
  double n = 0, bits_sum = 0;
  std::map<std::string, double> mix;  // "int4 g32" -> weights
  for (const MatrixReport& m : r.matrices) {
    const double w = static_cast<double>(m.rows) * static_cast<double>(m.cols);
    n += w;
    bits_sum += w * m.bits_per_weight;
    mix["int" + std::to_string(m.bits) + " " + (m.decision.group == m.cols ? std::string("K") : "g" + std::to_string(m.decision.group))] += w;
  }
  if (n > 0) {
    std::snprintf(line, sizeof line, "%.3f bits/weight over the quantized matrices%s:", bits_sum / n,
                  r.target_bits > 0 ? (" (target " + std::to_string(r.target_bits).substr(0, 5) + ")").c_str() : "");
    os << line;
    for (const auto& [k, w] : mix) {
      std::snprintf(line, sizeof line, " %s %.1f%%", k.c_str(), 100.0 * w / n);
      os << line;
    }
    os << "\n";
  }
  if (!r.calibration.empty()) {
    size_t calibrated = 0;
    for (const MatrixReport& m : r.matrices) calibrated += m.calibrated ? 1 : 0;
    os << "calibrated search (" << r.calibration << "): " << calibrated << " of " << r.matrices.size()
       << " matrices\n";
  }
  return os.str();
}

}  // namespace fineserve::quant
