// An output directory that appears only when complete: everything is written into a temporary
// sibling directory, which commit() renames into place. Destroyed without commit() (an error was
// thrown), it removes the temporary directory, so a failed run leaves no partial output. A run
// killed before it could clean up leaves its directory (".NAME.tmp-PID"): the next run for the
// same target removes those whose process is gone, never one of a live process.
#pragma once

#include <filesystem>

namespace fineserve::ckpt {

class AtomicDirectory {
 public:
  // Throws fineserve::Error when `target` exists (unless overwrite) or the parent is not writable.
  AtomicDirectory(std::filesystem::path target, bool overwrite);
  ~AtomicDirectory();
  AtomicDirectory(const AtomicDirectory&) = delete;
  AtomicDirectory& operator=(const AtomicDirectory&) = delete;

  // Where to write the files.
  const std::filesystem::path& path() const { return tmp_; }
  // Renames the temporary directory to the target (replacing an old one when overwrite was set).
  void commit();

 private:
  std::filesystem::path target_;
  std::filesystem::path tmp_;
  bool overwrite_;
  bool committed_ = false;
};

}  // namespace fineserve::ckpt
