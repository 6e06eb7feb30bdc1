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

// Maps a whole regular file read-only (MAP_PRIVATE); an empty file gives an empty span. Throws
// "cannot open|stat|map <path>: <reason>" or "<path>: not a regular file". Undo with unmap_file.
std::span<const std::byte> map_file(const std::filesystem::path& path);
void unmap_file(std::span<const std::byte> mapping);

// Drops the whole pages inside [begin, end) of a map_file mapping from this process's resident
// set. Only whole pages: the edge pages may hold bytes a caller still reads. MADV_DONTNEED on a
// read-only private file mapping keeps the mapping valid (the page cache keeps the pages; a later
// read faults them back in from the file). It is advice: a failure only leaves the pages resident.
void release_pages(const std::byte* begin, const std::byte* end);

inline std::span<const std::byte> as_bytes(std::string_view s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

}  // namespace fineserve::ckpt
