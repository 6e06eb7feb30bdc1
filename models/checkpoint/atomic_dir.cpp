#include "models/checkpoint/atomic_dir.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>

#include "kernels/base.h"

namespace fineserve::ckpt {
namespace fs = std::filesystem;

namespace {

// A run killed with SIGKILL (or by the OOM killer, or a power cut) never reaches its destructor
// and leaves its temporary directory behind. Remove those of `name` whose process is gone; a
// process that is alive (or that this user may not signal: it exists) keeps its own. A recycled
// PID only makes a dead run's directory wait for the next run.
void remove_stale_temporaries(const fs::path& parent, const std::string& name) {
  const std::string prefix = "." + name + ".tmp-";
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(parent, ec)) {
    const std::string file = e.path().filename().string();
    if (file.rfind(prefix, 0) != 0) continue;
    const std::string digits = file.substr(prefix.size());
    if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    const auto pid = static_cast<pid_t>(std::stol(digits));
    if (pid <= 0 || pid == ::getpid()) continue;
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // alive
    std::error_code rm;
    fs::remove_all(e.path(), rm);
    if (!rm) std::fprintf(stderr, "removed %s, left behind by process %d, which is gone\n", e.path().c_str(), static_cast<int>(pid));
  }
}

}  // namespace

AtomicDirectory::AtomicDirectory(fs::path target, bool overwrite)
    : target_(std::move(target)), overwrite_(overwrite) {
  if (target_.filename().empty()) target_ = target_.parent_path();  // "out/" -> "out"
  if (fs::exists(target_) && !overwrite_)
    throw Error("output " + target_.string() + " already exists (remove it or pass --force)");
  fs::path parent = target_.has_parent_path() ? target_.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw Error("cannot create " + parent.string() + ": " + ec.message());
  remove_stale_temporaries(parent, target_.filename().string());
  tmp_ = parent / ("." + target_.filename().string() + ".tmp-" + std::to_string(::getpid()));
  fs::remove_all(tmp_, ec);
  if (!fs::create_directory(tmp_, ec) || ec)
    throw Error("cannot create output directory in " + parent.string() + ": " +
                (ec ? ec.message() : std::string("already exists")));
}

AtomicDirectory::~AtomicDirectory() {
  if (committed_) return;
  std::error_code ec;
  fs::remove_all(tmp_, ec);
}

void AtomicDirectory::commit() {
  std::error_code ec;
  fs::path old;
  if (fs::exists(target_)) {
    old = target_.parent_path() / ("." + target_.filename().string() + ".old-" + std::to_string(::getpid()));
    fs::rename(target_, old, ec);
    if (ec) throw Error("cannot replace " + target_.string() + ": " + ec.message());
  }
  fs::rename(tmp_, target_, ec);
  if (ec) {
    if (!old.empty()) fs::rename(old, target_);
    throw Error("cannot rename output into " + target_.string() + ": " + ec.message());
  }
  committed_ = true;
  if (!old.empty()) fs::remove_all(old, ec);
}

}  // namespace fineserve::ckpt
