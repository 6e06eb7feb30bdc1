#include "models/checkpoint/atomic_dir.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>

#include "kernels/base.h"

namespace fineserve::ckpt {
namespace fs = std::filesystem;

AtomicDirectory::AtomicDirectory(fs::path target, bool overwrite)
    : target_(std::move(target)), overwrite_(overwrite) {
  if (target_.filename().empty()) target_ = target_.parent_path();  // "out/" -> "out"
  if (fs::exists(target_) && !overwrite_)
    throw Error("output " + target_.string() + " already exists (remove it or pass --force)");
  fs::path parent = target_.has_parent_path() ? target_.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw Error("cannot create " + parent.string() + ": " + ec.message());
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
