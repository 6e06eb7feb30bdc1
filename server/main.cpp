// fineserve: quantize, inspect, generate, serve, bench, eval. The binary sits on top of both
// server/ (the commands) and bench/ (the benchmarks, which drive the server).
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>

#include "bench/command.h"
#include "kernels/base.h"
#include "server/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"FineServe: a weight-only quantized LLM inference server (FineQuant int8/int4)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "fineserve 0.1.0");
  fineserve::add_quantize_command(app);
  fineserve::add_inspect_command(app);
  fineserve::add_synth_command(app);
  fineserve::add_generate_command(app);
  fineserve::add_serve_command(app);
  fineserve::add_bench_commands(app);
  fineserve::add_import_gguf_command(app);
  fineserve::add_eval_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const fineserve::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
