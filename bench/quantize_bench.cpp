// `fineserve bench quantize`: quantize throughput against the plain read speed of the same files,
// and the peak RSS of `fineserve quantize` against the largest tensor.
//
// Each scale rule (the default search, and plain absmax: `--no-search`) is timed, so the table
// shows what the per-group scale search costs against the I/O floor. Both speeds are measured in
// the same run, cold (the files' pages evicted from the page cache
// with posix_fadvise DONTNEED first) and warm (already cached).
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "bench/report.h"
#include "kernels/base.h"
#include "models/checkpoint/safetensors.h"
#include "models/synthetic.h"

namespace fineserve::bench {
namespace {
namespace fs = std::filesystem;

std::vector<fs::path> safetensors_files(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") files.push_back(e.path());
  return files;
}

void evict(const std::vector<fs::path>& files) {
  for (const auto& p : files) {
    int fd = ::open(p.c_str(), O_RDONLY);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

// Plain sequential read() of every file into one buffer: the I/O floor for quantizing them.
double read_seconds(const std::vector<fs::path>& files) {
  std::vector<char> buf(8 << 20);
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& p : files) {
    int fd = ::open(p.c_str(), O_RDONLY);
    if (fd < 0) throw Error("cannot open " + p.string());
    while (::read(fd, buf.data(), buf.size()) > 0) {
    }
    ::close(fd);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct ChildRun {
  double seconds = 0;
  double max_rss_gb = 0;
};

// Runs this binary's `quantize` in a child so its peak RSS is its own.
ChildRun run_quantize(const fs::path& model, const fs::path& out, int bits, const std::vector<std::string>& extra) {
  fs::remove_all(out);
  const std::string exe = fs::read_symlink("/proc/self/exe").string();
  const std::string bits_s = std::to_string(bits);
  std::vector<std::string> args = {exe, "quantize", "--model", model.string(), "--out", out.string(), "--bits", bits_s,
                                   "--quiet"};
  args.insert(args.end(), extra.begin(), extra.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  pid_t pid = ::fork();
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, STDOUT_FILENO);
    ::execv(exe.c_str(), argv.data());
    ::_exit(127);
  }
  int status = 0;
  rusage ru{};
  ::wait4(pid, &status, 0, &ru);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) throw Error("fineserve quantize failed in the benchmark");
  ChildRun r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.max_rss_gb = static_cast<double>(ru.ru_maxrss) * 1024 / 1e9;
  return r;
}

void setup(CLI::App& group) {
  struct Flags {
    std::string config = "configs/models/opt-1.3b.json";
    std::string model;
    std::string work;
    std::string out = "docs/results/quantize.json";
    int bits = 4;
    std::string group;
    bool keep = false;
  };
  auto f = std::make_shared<Flags>();
  CLI::App* cmd = group.add_subcommand("quantize", "Quantize throughput vs plain read speed, and peak RSS");
  cmd->add_option("--config", f->config, "OPT config for the synthetic checkpoint");
  cmd->add_option("--model", f->model, "Use this checkpoint instead of writing a synthetic one");
  cmd->add_option("--work", f->work, "Scratch directory (default: a temporary directory)");
  cmd->add_option("--bits", f->bits)->check(CLI::IsMember({8, 4}));
  cmd->add_option("--group", f->group, "Pass --group to quantize (default: its adaptive rule)");
  cmd->add_option("--out", f->out, "JSON result path");
  cmd->add_flag("--keep-files", f->keep, "Keep the scratch checkpoints");
  cmd->callback([f] {
    fs::path work = f->work.empty() ? fs::temp_directory_path() / ("fineserve-bench-" + std::to_string(::getpid()))
                                    : fs::path(f->work);
    fs::create_directories(work);
    fs::path model = f->model;
    if (model.empty()) {
      model = work / "source";
      if (!fs::exists(model)) {
        std::printf("writing a synthetic checkpoint from %s ...\n", f->config.c_str());
        SynthOptions so;
        so.config = f->config;
        so.out = model;
        write_synthetic_opt(so);
      }
    }
    const auto files = safetensors_files(fs::is_directory(model) ? model : model.parent_path());
    const ckpt::Checkpoint ck = ckpt::Checkpoint::open(model);
    uint64_t total = 0, largest = 0;
    for (const auto* t : ck.tensors()) {
      total += t->nbytes();
      largest = std::max<uint64_t>(largest, t->nbytes());
    }
    const double gb = static_cast<double>(total) / 1e9;

    Table table({"state", "scales", "read GB/s", "quantize GB/s", "quantize/read", "peak RSS GB", "largest tensor GB",
                 "RSS/largest"});
    nlohmann::json results = nlohmann::json::array();
    for (const bool cold : {true, false}) {
      for (const bool search : {true, false}) {
        std::vector<std::string> extra;
        if (!f->group.empty()) extra = {"--group", f->group};
        if (!search) extra.push_back("--no-search");
        if (cold) evict(files);
        const double read_s = read_seconds(files);
        if (cold) evict(files);
        else read_seconds(files);  // make sure everything is cached
        const ChildRun q = run_quantize(model, work / "out", f->bits, extra);
        const double read_gbs = gb / read_s, quant_gbs = gb / q.seconds;
        const double largest_gb = static_cast<double>(largest) / 1e9;
        const char* rule = search ? "search" : "absmax";
        table.add_row({cold ? "cold" : "warm", rule, fmt(read_gbs), fmt(quant_gbs), fmt(quant_gbs / read_gbs),
                       fmt(q.max_rss_gb), fmt(largest_gb), fmt(q.max_rss_gb / largest_gb)});
        results.push_back({{"cache", cold ? "cold" : "warm"},
                           {"scale_rule", rule},
                           {"group", f->group.empty() ? "adaptive" : f->group},
                           {"input_gb", gb},
                           {"bits", f->bits},
                           {"read_gbs", read_gbs},
                           {"quantize_gbs", quant_gbs},
                           {"quantize_over_read", quant_gbs / read_gbs},
                           {"peak_rss_gb", q.max_rss_gb},
                           {"largest_tensor_gb", largest_gb}});
      }
    }
    std::printf("quantize int%d of %s: %.2f GB of weights, %u threads\n", f->bits, model.c_str(), gb,
                std::thread::hardware_concurrency());
    table.print();
    write_result(f->out, "quantize", cpu_name(), {{"model", f->model.empty() ? f->config : f->model}, {"runs", results}});
    if (!f->keep && f->work.empty()) fs::remove_all(work);
  });
}

const Registrar registrar(setup);

}  // namespace
}  // namespace fineserve::bench
