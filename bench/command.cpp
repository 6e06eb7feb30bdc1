#include "bench/command.h"

#include "bench/report.h"

namespace fineserve {

void add_bench_commands(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Run a benchmark: prints a table and writes JSON");
  bench->require_subcommand(1);
  bench::add_all(*bench);
}

}  // namespace fineserve
