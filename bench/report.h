// What every benchmark shares: self-registration as `fineserve bench <name>`, a printed table,
// and a JSON result carrying the device, the date and the command (docs/results/*.json).
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

namespace fineserve::bench {

// A benchmark adds its own subcommand to the `bench` group.
using Setup = void (*)(CLI::App& bench_group);
struct Registrar {
  explicit Registrar(Setup setup);
};
void add_all(CLI::App& bench_group);

// A plain text table: columns right-aligned, printed to stdout.
class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void add_row(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  void print() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

std::string fmt(double v, int precision = 2);
double median(std::vector<double> v);  // the upper median; v must not be empty
std::string cpu_name();  // from /proc/cpuinfo
std::string now_utc();   // ISO 8601
std::string command_line();  // as the process was started

// Writes {"benchmark", "device", "date", "command", "results"} to path (creating its folder).
void write_result(const std::string& path, const std::string& benchmark, const std::string& device,
                  const nlohmann::json& results);

}  // namespace fineserve::bench
