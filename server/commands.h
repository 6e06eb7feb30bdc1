// The `fineserve` subcommands. Each add_*_command registers its flags on the app and the callback
// that runs it; callbacks throw fineserve::Error for bad input, which main() reports and turns into
// a non-zero exit.
#pragma once

#include <CLI/CLI.hpp>

#include "server/device.h"  // parse_device, make_backend: every command that runs a model

namespace fineserve {

void add_quantize_command(CLI::App& app);
void add_inspect_command(CLI::App& app);
void add_synth_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_serve_command(CLI::App& app);
void add_import_gguf_command(CLI::App& app);
void add_eval_command(CLI::App& app);  // `fineserve eval ppl`

}  // namespace fineserve
