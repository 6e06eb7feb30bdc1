#include "bench/report.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "kernels/base.h"

namespace fineserve::bench {
namespace {
std::vector<Setup>& registry() {
  static std::vector<Setup> setups;
  return setups;
}
}  // namespace

Registrar::Registrar(Setup setup) { registry().push_back(setup); }

void add_all(CLI::App& bench_group) {
  for (Setup s : registry()) s(bench_group);
}

void Table::print() const {
  std::vector<size_t> width(header_.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < width.size(); ++i) width[i] = std::max(width[i], row[i].size());
  };
  measure(header_);
  for (const auto& r : rows_) measure(r);
  auto print_row = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < width.size(); ++i) {
      const std::string& cell = i < row.size() ? row[i] : std::string();
      std::printf("%s%*s", i ? "  " : "", static_cast<int>(width[i]), cell.c_str());
    }
    std::printf("\n");
  };
  print_row(header_);
  size_t total = 0;
  for (size_t w : width) total += w + 2;
  std::printf("%s\n", std::string(total > 2 ? total - 2 : 0, '-').c_str());
  for (const auto& r : rows_) print_row(r);
  std::fflush(stdout);
}

double median(std::vector<double> v) {
  FS_ASSERT(!v.empty());
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string fmt(double v, int precision) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", precision, v);
  return buf;
}

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

std::string now_utc() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::replace(raw.begin(), raw.end(), '\0', ' ');
  while (!raw.empty() && raw.back() == ' ') raw.pop_back();
  // Keep the command relative to the project: drop the directory of the binary.
  auto space = raw.find(' ');
  std::string exe = raw.substr(0, space);
  std::string rest = space == std::string::npos ? "" : raw.substr(space);
  return std::filesystem::path(exe).filename().string() + rest;
}

void write_result(const std::string& path, const std::string& benchmark, const std::string& device,
                  const nlohmann::json& results) {
  nlohmann::json doc = {{"benchmark", benchmark},
                        {"device", device},
                        {"date", now_utc()},
                        {"command", command_line()},
                        {"results", results}};
  std::filesystem::path p(path);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  std::ofstream out(p);
  if (!out) throw Error("cannot write benchmark result " + path);
  out << doc.dump(2) << "\n";
  std::printf("wrote %s\n", path.c_str());
}

}  // namespace fineserve::bench
