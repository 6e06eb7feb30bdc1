// `fineserve inspect`: a checkpoint's tensors, dtypes, shapes and quantization settings.
#include <cstdio>
#include <filesystem>
#include <memory>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "quant/format.h"
#include "server/commands.h"

namespace fineserve {

void add_inspect_command(CLI::App& app) {
  struct Flags {
    std::string path;
    bool json = false;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand("inspect", "List a checkpoint's tensors and quantization settings");
  cmd->add_option("path", f->path, "Checkpoint directory or .safetensors file")->required();
  cmd->add_flag("--json", f->json, "Print JSON instead of a table");
  cmd->callback([f] {
    const ckpt::Checkpoint c = ckpt::Checkpoint::open(f->path);
    const ckpt::Metadata& meta = c.metadata();
    const std::optional<quant::FormatMetadata> format = quant::read_header_metadata(meta, f->path);
    const bool quantized = format.has_value();
    nlohmann::json out = {{"path", f->path}, {"files", c.files().size()}, {"bytes", c.total_bytes()}};
    out["metadata"] = meta;
    nlohmann::json tensors = nlohmann::json::array();
    for (const ckpt::TensorInfo* t : c.tensors()) {
      nlohmann::json j = {{"name", t->name}, {"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"bytes", t->nbytes()}};
      const std::string stem = t->name.substr(0, t->name.rfind('.'));
      if (quantized && t->name != stem && t->name == quant::codes_name(stem)) {
        if (auto g = format->groups.find(stem); g != format->groups.end()) j["group"] = g->second;
        j["bits"] = format->bits_of(stem);
        j["asymmetric"] = c.has(quant::offsets_name(stem));
        j["source_format"] = format->source_format_of(stem);
      } else if (quantized && t->name == stem + ".weight" && t->shape.size() == 2 && format->source_formats.count(stem)) {
        j["source_format"] = format->source_formats.at(stem);  // a dense matrix of a converted checkpoint
      }
      tensors.push_back(j);
    }
    out["tensors"] = tensors;
    if (f->json) {
      std::printf("%s\n", out.dump(2).c_str());
      return;
    }
    std::printf("%s: %zu file(s), %zu tensors, %.3f GB\n", f->path.c_str(), c.files().size(), tensors.size(),
                static_cast<double>(c.total_bytes()) / 1e9);
    for (const auto& [k, v] : meta) {
      if (k == "groups" || k == "matrix_bits" || k == "source_formats") continue;  // shown per tensor
      std::printf("  %s = %s\n", k.c_str(), v.c_str());
    }
    if (quantized) std::printf("  source formats = %s\n", format->source_format_summary().c_str());
    std::printf("\n%-60s %-5s %-20s %12s %s\n", "tensor", "dtype", "shape", "bytes", quantized ? "quant (source)" : "");
    for (const auto& j : tensors) {
      std::string q;
      if (j.contains("bits")) {
        const int64_t g = j.contains("group") ? j["group"].get<int64_t>() : 0;
        q = "int" + std::to_string(j["bits"].get<int>()) + " g=" + std::to_string(g) +
            (j["asymmetric"].get<bool>() ? " asym" : "");
      }
      if (j.contains("source_format")) q += (q.empty() ? "(" : " (") + j["source_format"].get<std::string>() + ")";
      std::printf("%-60s %-5s %-20s %12llu %s\n", j["name"].get<std::string>().c_str(),
                  j["dtype"].get<std::string>().c_str(), ckpt::format_shape(j["shape"].get<std::vector<int64_t>>()).c_str(),
                  static_cast<unsigned long long>(j["bytes"].get<uint64_t>()), q.c_str());
    }
  });
}

}  // namespace fineserve
