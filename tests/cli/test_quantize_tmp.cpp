// `fineserve quantize` cleans up after runs that were killed (SIGKILL, OOM): their ".OUT.tmp-PID"
// folders are removed at the next run's start when PID is gone, never when it is alive.
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "cli_util.h"

namespace fineserve {
namespace {
namespace fs = std::filesystem;
using testing::run_fineserve;
using testing::ScratchDir;

// The PID of a process that has exited (and was reaped).
pid_t dead_pid() {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  int st = 0;
  ::waitpid(pid, &st, 0);
  return pid;
}

fs::path leftover(const fs::path& dir, const std::string& name, pid_t pid) {
  const fs::path p = dir / ("." + name + ".tmp-" + std::to_string(pid));
  fs::create_directories(p);
  std::ofstream(p / "model.safetensors") << std::string(4096, 'x');
  return p;
}

TEST(QuantizeTmp, StaleFoldersOfDeadRunsAreRemovedLiveOnesKept) {
  ScratchDir tmp;
  const fs::path cfg = testing::write_tiny_opt_config(tmp / "cfg");
  const fs::path src = tmp / "src";
  auto r = run_fineserve("synth --config " + cfg.string() + " --out " + src.string() + " --seed 7");
  ASSERT_EQ(r.status, 0) << r.output;

  const fs::path dead = leftover(tmp.path(), "out", dead_pid());
  const fs::path live = leftover(tmp.path(), "out", ::getpid());  // this test process: alive
  const fs::path other = leftover(tmp.path(), "other", dead_pid());  // another output's: not ours to judge
  r = run_fineserve("quantize --model " + src.string() + " --out " + (tmp / "out").string() + " --bits 8");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(tmp / "out" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dead)) << r.output;
  EXPECT_NE(r.output.find("which is gone"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(live / "model.safetensors"));
  EXPECT_TRUE(fs::exists(other));
}

}  // namespace
}  // namespace fineserve
