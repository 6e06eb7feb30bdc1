#include "models/checkpoint/util.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <system_error>

#include "kernels/base.h"
#include "models/checkpoint/safetensors.h"

namespace fineserve::ckpt {

namespace {

// Linux moves at most 0x7ffff000 bytes per write(2) call anyway; asking for 1 GiB at a time keeps
// every request inside that and inside ssize_t on any platform.
constexpr size_t kMaxIoBytes = size_t{1} << 30;

// Closes a file descriptor on scope exit unless released.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::string errno_message(const std::string& what, const std::filesystem::path& path, int err) {
  return what + " " + path.string() + ": " + std::generic_category().message(err);
}

std::span<const std::byte> map_file(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(errno_message("cannot open", path, errno));
  FdGuard guard{fd};  // the mapping keeps its own reference to the file
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error(errno_message("cannot stat", path, errno));
  if (!S_ISREG(st.st_mode)) throw Error(path.string() + ": not a regular file");
  const auto size = static_cast<size_t>(st.st_size);
  if (size == 0) return {};  // mmap refuses a zero length; the format parsers report the empty file
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) throw Error(errno_message("cannot map", path, errno));
  return {static_cast<const std::byte*>(p), size};
}

void unmap_file(std::span<const std::byte> mapping) {
  if (!mapping.empty()) ::munmap(const_cast<std::byte*>(mapping.data()), mapping.size());
}

void release_pages(const std::byte* begin, const std::byte* end) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(begin) + page - 1) / page * page;
  const uintptr_t hi = reinterpret_cast<uintptr_t>(end) / page * page;
  if (lo < hi) (void)::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

std::string read_file(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(errno_message("cannot read", path, errno));
  FdGuard guard{fd};
  std::string text;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(errno_message("cannot read", path, errno));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  return text;
}

void write_all(int fd, std::span<const std::byte> bytes, const std::filesystem::path& path) {
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd, bytes.data(), std::min(bytes.size(), kMaxIoBytes));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(errno_message("cannot write", path, errno));
    }
    if (n == 0) throw Error(errno_message("cannot write", path, EIO));
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
}

void pwrite_all(int fd, std::span<const std::byte> bytes, uint64_t offset, const std::filesystem::path& path) {
  while (!bytes.empty()) {
    const ssize_t n = ::pwrite(fd, bytes.data(), std::min(bytes.size(), kMaxIoBytes), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(errno_message("cannot write", path, errno));
    }
    if (n == 0) throw Error(errno_message("cannot write", path, EIO));
    bytes = bytes.subspan(static_cast<size_t>(n));
    offset += static_cast<uint64_t>(n);
  }
}

void write_file(const std::filesystem::path& path, std::string_view text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(errno_message("cannot create", path, errno));
  FdGuard guard{fd};
  write_all(fd, as_bytes(text), path);
  if (::fsync(fd) != 0) throw Error(errno_message("cannot sync", path, errno));
  guard.fd = -1;
  if (::close(fd) != 0) throw Error(errno_message("cannot close", path, errno));
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

void fsync_dir(const std::filesystem::path& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw Error(errno_message("cannot open directory", dir, errno));
  FdGuard guard{fd};
  // Some file systems refuse fsync on a directory (EINVAL); the entries are then as durable as
  // they will get, so that is not an error.
  if (::fsync(fd) != 0 && errno != EINVAL) throw Error(errno_message("cannot sync directory", dir, errno));
}

}  // namespace fineserve::ckpt
