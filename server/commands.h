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

// The backend for --device (cpu; cuda when built with it). Throws fineserve::Error otherwise.
std::unique_ptr<Backend> make_backend(const std::string& device);

}  // namespace fineserve
