// `fineserve import-gguf`: a llama.cpp GGUF file in; out a FineQuant checkpoint with its Q4_0 / Q8_0 /
// Q4_1 blocks re-laid exactly (the default, quant/gguf_convert.h), or with --dtype a dense Hugging
// Face checkpoint (every tensor dequantized).
#include <cstdio>
#include <memory>

#include "kernels/base.h"
#include "models/checkpoint/gguf_import.h"
#include "quant/gguf_convert.h"
#include "server/commands.h"
#include "server/progress.h"

namespace fineserve {

void add_import_gguf_command(CLI::App& app) {
  struct Flags {
    std::string file, out, dtype = "native";
    double shard_gb = 4;
    bool force = false;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = app.add_subcommand(
      "import-gguf", "Convert a llama.cpp GGUF file (Llama family) into a Hugging Face checkpoint that quantize takes");
  cmd->add_option("file", f->file, "The .gguf file")->required();
  cmd->add_option("--out", f->out, "Output directory (created; must not exist unless --force)")->required();
  cmd->add_option("--dtype", f->dtype,
                  "native (default): Q4_0/Q8_0/Q4_1 kept exactly as FineQuant int4/int8 g32, other quantized "
                  "matrices re-quantized to int8 g32; f16/bf16/f32: a dense checkpoint, every tensor dequantized")
      ->check(CLI::IsMember({"native", "f16", "bf16", "f32"}));
  cmd->add_option("--shard-gb", f->shard_gb, "Maximum shard size in GB")->check(CLI::PositiveNumber);
  cmd->add_flag("--force", f->force, "Replace an existing output directory");
  cmd->callback([f] {
    ProgressBar bar("import");
    // Both imports report progress per tensor the same way.
    const auto progress = [&bar](size_t done, size_t total, const std::string& tensor) {
      bar.update(total ? static_cast<double>(done) / static_cast<double>(total) : 1.0,
                 std::to_string(done) + "/" + std::to_string(total) + " " + tensor);
    };
    if (f->dtype == "native") {
      quant::GgufConvertOptions o;
      o.gguf = f->file;
      o.out = f->out;
      o.max_shard_bytes = static_cast<uint64_t>(f->shard_gb * 1e9);
      o.overwrite = f->force;
      const quant::GgufConvertReport r = quant::convert_gguf(o, progress);
      bar.done();
      std::printf("imported %s%s: %zu matrices exact, %zu re-quantized (int8 g32), %zu dense tensors; %.1f MB -> "
                  "%.1f MB in %.1f s\nwrote %s\n",
                  r.import.architecture.c_str(),
                  r.import.model_name.empty() ? "" : (" '" + r.import.model_name + "'").c_str(), r.exact,
                  r.requantized, r.dense, static_cast<double>(r.import.bytes_in) / 1e6,
                  static_cast<double>(r.import.bytes_out) / 1e6, r.import.seconds, f->out.c_str());
      return;
    }
    ckpt::GgufImportOptions o;
    o.gguf = f->file;
    o.out = f->out;
    o.dtype = f->dtype == "f16" ? DType::F16 : f->dtype == "bf16" ? DType::BF16 : DType::F32;
    o.max_shard_bytes = static_cast<uint64_t>(f->shard_gb * 1e9);
    o.overwrite = f->force;
    const ckpt::GgufImportReport r = ckpt::import_gguf(o, progress);
    bar.done();
    std::string types;
    for (const auto& [type, count] : r.source_types) types += (types.empty() ? "" : ", ") + std::to_string(count) + " " + type;
    std::printf("imported %s%s: %zu tensors (%s), %.1f MB -> %.1f MB %s in %.1f s\nwrote %s\n",
                r.architecture.c_str(), r.model_name.empty() ? "" : (" '" + r.model_name + "'").c_str(), r.tensors,
                types.c_str(), static_cast<double>(r.bytes_in) / 1e6, static_cast<double>(r.bytes_out) / 1e6,
                f->dtype.c_str(), r.seconds, f->out.c_str());
  });
}

}  // namespace fineserve
