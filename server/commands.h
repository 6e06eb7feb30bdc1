// The `fineserve` subcommands. Each add_*_command registers its flags on the app and the callback
// that runs it; callbacks throw fineserve::Error for bad input, which main() reports and turns into
// a non-zero exit.
#pragma once

#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "kernels/backend.h"

namespace fineserve {

void add_quantize_command(CLI::App& app);
void add_inspect_command(CLI::App& app);
void add_synth_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_serve_command(CLI::App& app);
void add_bench_commands(CLI::App& app);  // bench/: `fineserve bench <name>`
void add_import_gguf_command(CLI::App& app);
void add_eval_command(CLI::App& app);  // `fineserve eval ppl`

// A --device value: "cpu", "cuda" (GPU 0) or "cuda:N".
struct DeviceSpec {
  bool cuda = false;
  int index = 0;  // the GPU (cuda only)
  bool explicit_index = false;  // "cuda:N" rather than "cuda"
};
// Parses --device; throws fineserve::Error naming the value when it is none of the above.
DeviceSpec parse_device(const std::string& device);

// The backend for --device and --dtype: the activation dtype on CUDA, "fp16" (the default, also
// when empty) or "bf16"; the CPU computes in fp32 and takes only "" or "fp32". Throws
// fineserve::Error for a bad value, a build without CUDA, or a GPU that is not there.
std::unique_ptr<Backend> make_backend(const std::string& device, const std::string& dtype = "");

// The flag text both take, for --help.
inline constexpr const char* kDeviceHelp = "cpu, cuda (GPU 0) or cuda:N";
inline constexpr const char* kDtypeHelp = "CUDA activation dtype: fp16 (default) or bf16";

}  // namespace fineserve
