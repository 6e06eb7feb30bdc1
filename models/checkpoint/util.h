// Internal helpers shared by the checkpoint sources (not part of the public API): POSIX file I/O
// whose every failure becomes a fineserve::Error naming the path and the system's reason, and
// message formatting.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fineserve::ckpt {

// "<what> <path>: <strerror(err)>"
std::string errno_message(const std::string& what, const std::filesystem::path& path, int err);

// The whole file as a string; throws "cannot read <path>: <reason>".
std::string read_file(const std::filesystem::path& path);

// write(2) / pwrite(2) until every byte is out, retrying on EINTR and short writes.
void write_all(int fd, std::span<const std::byte> bytes, const std::filesystem::path& path);
void pwrite_all(int fd, std::span<const std::byte> bytes, uint64_t offset, const std::filesystem::path& path);

// Creates (truncating) `path` and writes `text` into it durably (write, fsync, close).
void write_file(const std::filesystem::path& path, std::string_view text);

// fsync on a directory, so that renames and new entries in it survive a crash.
void fsync_dir(const std::filesystem::path& dir);

// "[2, 3]"
std::string format_shape(const std::vector<int64_t>& shape);

inline std::span<const std::byte> as_bytes(std::string_view s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

}  // namespace fineserve::ckpt
