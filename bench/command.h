// `fineserve bench <name>`: the bench group of the fineserve binary. The benchmarks stand on top
// of the server (bench -> server -> engine -> models), so the binary, not server/, adds them.
#pragma once

#include <CLI/CLI.hpp>

namespace fineserve {

void add_bench_commands(CLI::App& app);

}  // namespace fineserve
