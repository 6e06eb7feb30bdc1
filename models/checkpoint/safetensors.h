// safetensors checkpoints: a memory-mapped, zero-copy reader that validates every header field,
// a streaming writer, and sharded checkpoints (model.safetensors.index.json).
//
// File layout: u64 little-endian header length N, N bytes of JSON header, then the data buffer.
// The header maps tensor names to {dtype, shape, data_offsets: [begin, end)} relative to the start
// of the data buffer, plus an optional "__metadata__" map of string to string.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <set>

#include <nlohmann/json_fwd.hpp>

#include "kernels/dtype.h"

namespace fineserve::ckpt {

using Metadata = std::map<std::string, std::string>;

// A shape as messages print it: "[2, 3]" (the one formatter every layer's messages use).
std::string format_shape(const std::vector<int64_t>& shape);

// The largest header a reader accepts (as the reference implementation does): a bound on the
// memory a hostile file can make the JSON parser allocate.
inline constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offset inside the data buffer
  uint64_t end = 0;    // one past the last byte

  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

// Bytes of a tensor of this dtype and shape; nullopt when a dimension is negative or the size does
// not fit in int64 elements / uint64 bytes. Any zero dimension makes it 0.
std::optional<uint64_t> tensor_nbytes(DType dtype, const std::vector<int64_t>& shape);

struct Header {
  std::vector<TensorInfo> tensors;  // sorted by begin offset
  Metadata metadata;
};

// Parses and validates a header (the JSON text) against a data buffer of `data_size` bytes:
// known dtype, non-negative shape, offsets in order and inside the buffer, shape x dtype size equal
// to the byte span (overflow-checked), no two tensors overlapping, metadata values strings.
// Throws fineserve::Error naming `label` (the file) and the offending tensor.
Header parse_header(std::string_view json_text, uint64_t data_size, const std::string& label);

// The in-memory half of SafetensorsFile::open: checks the length prefix and the header of a whole
// file held in `file`, then parse_header. The data buffer starts at byte `data_start` of the file.
struct ParsedFile {
  uint64_t data_start = 0;  // 8 + header length
  Header header;
};
ParsedFile parse_file_bytes(std::span<const std::byte> file, const std::string& label);

// A tensor to lay out in a file built in memory (SafetensorsFile::build_in_memory).
struct TensorDecl {
  std::string name;
  DType dtype = DType::F16;
  std::vector<int64_t> shape;
};

// A view of one tensor's bytes inside a mapped file; valid while the file is open.
struct TensorView {
  const TensorInfo* info = nullptr;
  const std::byte* data = nullptr;  // may be unaligned

  const std::string& name() const { return info->name; }
  DType dtype() const { return info->dtype; }
  const std::vector<int64_t>& shape() const { return info->shape; }
  int64_t numel() const { return info->numel(); }
  uint64_t nbytes() const { return info->nbytes(); }
};

class SafetensorsFile {
 public:
  // Maps the file read-only and validates its header. Throws fineserve::Error on any defect.
  static std::unique_ptr<SafetensorsFile> open(const std::filesystem::path& path);
  // A file built in anonymous memory instead of read from disk (synthetic checkpoints,
  // models/synthetic.h), so that everything reading safetensors reads it unchanged: lays `tensors`
  // out back to back in the given order after a header holding them and `metadata` (padded with
  // spaces so that the data starts 64-byte aligned), validates that image as open() validates a
  // file, then calls fill(info, bytes) once per tensor, in order, to write its info.nbytes() bytes.
  // `label` stands in for the path (path(), messages). Throws fineserve::Error on a duplicate name,
  // a shape too large, or when the memory cannot be had.
  static std::unique_ptr<SafetensorsFile> build_in_memory(
      const std::string& label, const std::vector<TensorDecl>& tensors, const Metadata& metadata,
      const std::function<void(const TensorInfo& info, std::byte* bytes)>& fill);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const Metadata& metadata() const { return header_.metadata; }
  uint64_t file_size() const { return size_; }
  std::string_view header_json() const;

  const TensorInfo* find(std::string_view name) const;  // nullptr when absent
  TensorView view(const TensorInfo& t) const;
  // Drops the tensor's pages from this process's resident set (they stay in the page cache), so
  // streaming through a large checkpoint keeps the peak RSS to a few tensors. Does nothing for a
  // file built in memory (its pages have no file to be read back from).
  void release(const TensorInfo& t) const;
  bool in_memory() const { return in_memory_; }

 private:
  SafetensorsFile() = default;
  std::filesystem::path path_;
  bool in_memory_ = false;
  const std::byte* base_ = nullptr;
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;
  Header header_;
  std::map<std::string, size_t, std::less<>> index_;
};

// A checkpoint: a directory holding config.json and either model.safetensors, a sharded set
// described by model.safetensors.index.json, or other *.safetensors files; or one .safetensors file.
class Checkpoint {
 public:
  // Throws fineserve::Error naming the path (and the index, shard or tensor) on any defect.
  static Checkpoint open(const std::filesystem::path& path);
  // A checkpoint over files built in memory (SafetensorsFile::build_in_memory); `label` stands in
  // for the directory in dir() and in messages. Throws fineserve::Error when two files hold a
  // tensor of the same name.
  static Checkpoint from_files(const std::filesystem::path& label, std::vector<std::unique_ptr<SafetensorsFile>> files);

  const std::filesystem::path& dir() const { return dir_; }
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  // All tensors, in file order then offset order (the order that reads each file sequentially).
  std::vector<const TensorInfo*> tensors() const;
  bool has(std::string_view name) const;
  const TensorInfo* find(std::string_view name) const;  // nullptr when absent
  // Throws fineserve::Error "checkpoint <dir>: missing tensor <name>" when absent.
  TensorView get(std::string_view name) const;
  const SafetensorsFile& file_of(std::string_view name) const;
  // Metadata of the first file (writers put checkpoint-wide metadata in every shard).
  const Metadata& metadata() const;
  uint64_t total_bytes() const;  // sum of file sizes

 private:
  void add_file(std::unique_ptr<SafetensorsFile> file);
  std::filesystem::path source_;  // the path given to open(), for messages
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t, std::less<>> owner_;  // tensor name -> index into files_
};

// Writes one safetensors file in a single sequential pass: space for the header is reserved
// up front (`header_reserve` bytes, see header_reserve_for), tensors are appended as they come,
// and finish() writes the header into the reserved space padded with spaces, as the format allows.
// The file is written to `path` directly; callers wanting atomicity write into a temporary directory.
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::filesystem::path& path, uint64_t header_reserve);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Throws fineserve::Error when data.size() != numel(shape) * dtype_size, or on a duplicate name,
  // or on a write error (disk full, ...).
  void add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::span<const std::byte> data);
  void finish(const Metadata& metadata);
  uint64_t data_bytes() const { return data_bytes_; }

 private:
  std::filesystem::path path_;
  int fd_ = -1;
  uint64_t reserve_;
  uint64_t data_bytes_ = 0;
  std::vector<TensorInfo> written_;
  std::set<std::string, std::less<>> names_;
  bool finished_ = false;
};

// An upper bound on the header size of a file holding these tensor names and metadata.
uint64_t header_reserve_for(const std::vector<std::string>& names, const Metadata& metadata, int max_rank = 4);

// Writes a checkpoint split into shards of at most `max_shard_bytes` of data each (a tensor larger
// than that gets a shard of its own). One shard is named model.safetensors; several are named
// model-0000i-of-0000n.safetensors with a model.safetensors.index.json, as Hugging Face does.
class CheckpointWriter {
 public:
  // The highest tensor rank add() accepts (the header reservation assumes it).
  static constexpr int kMaxRank = 8;

  // `names` lists every tensor that will be added and `metadata` the metadata keys with values at
  // least as long as the final ones (both size the header reservation).
  CheckpointWriter(const std::filesystem::path& dir, std::vector<std::string> names, Metadata metadata,
                   uint64_t max_shard_bytes);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  // Throws fineserve::Error for a name not declared in `names` or added twice, a rank above
  // kMaxRank, or anything SafetensorsWriter::add rejects.
  void add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, std::span<const std::byte> data);
  // Throws fineserve::Error when a declared tensor was never added. Every shard's header is written
  // here, so each carries the same (final) metadata: the constructor's, or `metadata` when given,
  // which may hold values decided while writing (e.g. group sizes) and must fit the reservation.
  void finish();
  void finish(const Metadata& metadata);

 private:
  void open_shard();
  std::filesystem::path dir_;
  std::vector<std::string> names_;  // sorted, for lookup
  Metadata metadata_;
  uint64_t max_shard_bytes_;
  uint64_t reserve_;
  std::vector<std::unique_ptr<SafetensorsWriter>> shards_;  // open until finish()
  std::vector<std::filesystem::path> shard_paths_;
  std::map<std::string, size_t> weight_map_;  // tensor -> shard index
  uint64_t total_bytes_ = 0;
  bool finished_ = false;
};

}  // namespace fineserve::ckpt
