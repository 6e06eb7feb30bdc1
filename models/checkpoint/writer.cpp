// safetensors writing: one file in a single sequential pass, and sharded checkpoints.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/checkpoint/safetensors.h"
#include "models/checkpoint/util.h"

namespace fineserve::ckpt {

namespace fs = std::filesystem;

namespace {

// The data buffer starts at 8 + reserve; rounding that to 64 bytes keeps every file's data
// cache-line aligned in the mapping (and so 8-byte aligned for the first tensor at least).
constexpr uint64_t kDataAlignment = 64;

uint64_t round_reserve(uint64_t reserve) {
  return (8 + reserve + kDataAlignment - 1) / kDataAlignment * kDataAlignment - 8;
}

// nlohmann::json refuses to serialise invalid UTF-8; catching that here names the culprit (with
// the bad bytes replaced, so that the message itself is valid UTF-8).
void check_utf8(const std::string& s, const fs::path& path, const std::string& what) {
  try {
    (void)nlohmann::json(s).dump();
  } catch (const nlohmann::json::type_error&) {
    throw Error(path.string() + ": " + what + " " +
                nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
                " is not valid UTF-8");
  }
}

// Upper bound on the JSON text of a string: quotes plus, worst case, a 6-byte \u00XX escape per
// byte (control characters); every other character is written as is or as a 2-byte escape.
uint64_t escaped_bound(const std::string& s) { return 6 * s.size() + 2; }

}  // namespace

// ---- SafetensorsWriter ------------------------------------------------------------------------

SafetensorsWriter::SafetensorsWriter(const fs::path& path, uint64_t header_reserve)
    : path_(path), reserve_(round_reserve(header_reserve)) {
  if (reserve_ > kMaxHeaderBytes)
    throw Error(path.string() + ": header reservation of " + std::to_string(reserve_) + " bytes exceeds the " +
                std::to_string(kMaxHeaderBytes) + "-byte limit readers accept");
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(errno_message("cannot create", path, errno));
  // Length prefix (little-endian) and a placeholder of spaces that finish() overwrites.
  std::string prefix(8 + reserve_, ' ');
  for (int i = 0; i < 8; ++i) prefix[static_cast<size_t>(i)] = static_cast<char>((reserve_ >> (8 * i)) & 0xff);
  try {
    write_all(fd_, as_bytes(prefix), path_);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

SafetensorsWriter::~SafetensorsWriter() {
  // Without finish() the file is incomplete (its header is all spaces, which readers reject);
  // the caller, writing into a temporary directory, deletes it.
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsWriter::add(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                            std::span<const std::byte> data) {
  FS_ASSERT(!finished_ && fd_ >= 0, "add() after finish() or after a write error");
  if (name.empty()) throw Error(path_.string() + ": empty tensor name");
  check_utf8(name, path_, "tensor name");
  const std::string label = path_.string() + ": tensor '" + name + "'";
  if (name == "__metadata__") throw Error(label + ": the name is reserved for metadata");
  if (names_.count(name)) throw Error(label + ": added twice");
  const auto nbytes = tensor_nbytes(dtype, shape);
  if (!nbytes) throw Error(label + ": invalid shape " + format_shape(shape));
  if (*nbytes != data.size())
    throw Error(label + ": " + std::to_string(data.size()) + " bytes of data but shape " + format_shape(shape) +
                " of " + std::string(dtype_name(dtype)) + " needs " + std::to_string(*nbytes));
  try {
    write_all(fd_, data, path_);
  } catch (...) {
    ::close(fd_);  // the file is now inconsistent; no further add() or finish()
    fd_ = -1;
    throw;
  }
  written_.push_back(TensorInfo{name, dtype, shape, data_bytes_, data_bytes_ + data.size()});
  names_.insert(name);
  data_bytes_ += data.size();
}

void SafetensorsWriter::finish(const Metadata& metadata) {
  FS_ASSERT(!finished_ && fd_ >= 0, "finish() twice or after a write error");
  for (const auto& [key, value] : metadata) {
    check_utf8(key, path_, "metadata key");
    check_utf8(value, path_, "metadata value");
  }
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  for (const TensorInfo& t : written_) {
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  std::string text = header.dump();
  FS_ASSERT(text.size() <= reserve_, "header larger than its reservation: size it with header_reserve_for()");
  text.resize(reserve_, ' ');  // the format allows trailing spaces

  const int fd = fd_;
  fd_ = -1;
  try {
    pwrite_all(fd, as_bytes(text), 8, path_);
    if (::fsync(fd) != 0) throw Error(errno_message("cannot sync", path_, errno));
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0) throw Error(errno_message("cannot close", path_, errno));
  finished_ = true;
}

uint64_t header_reserve_for(const std::vector<std::string>& names, const Metadata& metadata, int max_rank) {
  FS_ASSERT(max_rank >= 0);
  // One entry: "name":{"dtype":"BF16","shape":[d,...],"data_offsets":[b,e]}, -- 47 bytes of fixed
  // text (64 allowed), up to 20 digits and a comma per dimension, 20 digits per offset.
  const uint64_t per_tensor = 64 + 21 * static_cast<uint64_t>(max_rank) + 2 * 20;
  uint64_t total = 2 + 64;  // braces, slack
  for (const std::string& name : names) total += escaped_bound(name) + 1 + per_tensor;
  if (!metadata.empty()) {
    total += 32;  // "__metadata__":{},
    for (const auto& [key, value] : metadata) total += escaped_bound(key) + escaped_bound(value) + 2;
  }
  return round_reserve(total);
}

// ---- CheckpointWriter -------------------------------------------------------------------------

namespace {

std::string shard_name(size_t index, size_t count) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return buf;
}

// Until the shard count is known, shards carry a name no reader picks up as a checkpoint file.
std::string partial_name(size_t index) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu.safetensors.partial", index + 1);
  return buf;
}

}  // namespace

CheckpointWriter::CheckpointWriter(const fs::path& dir, std::vector<std::string> names, Metadata metadata,
                                   uint64_t max_shard_bytes)
    : dir_(dir), names_(std::move(names)), metadata_(std::move(metadata)), max_shard_bytes_(max_shard_bytes) {
  FS_ASSERT(max_shard_bytes_ > 0);
  std::sort(names_.begin(), names_.end());
  const auto dup = std::adjacent_find(names_.begin(), names_.end());
  if (dup != names_.end()) throw Error("checkpoint " + dir_.string() + ": tensor '" + *dup + "' declared twice");
  // Every shard holds a subset of the names, so one bound covers them all.
  reserve_ = header_reserve_for(names_, metadata_, kMaxRank);
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) throw Error("cannot create directory " + dir_.string() + ": " + ec.message());
}

CheckpointWriter::~CheckpointWriter() = default;

void CheckpointWriter::open_shard() {
  shard_paths_.push_back(dir_ / partial_name(shard_paths_.size()));
  shards_.push_back(std::make_unique<SafetensorsWriter>(shard_paths_.back(), reserve_));
}

void CheckpointWriter::add(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                           std::span<const std::byte> data) {
  FS_ASSERT(!finished_, "add() after finish()");
  const std::string label = "checkpoint " + dir_.string() + ": tensor '" + name + "'";
  if (!std::binary_search(names_.begin(), names_.end(), name)) throw Error(label + " was not declared");
  if (weight_map_.count(name)) throw Error(label + " added twice");
  if (shape.size() > static_cast<size_t>(kMaxRank))
    throw Error(label + ": rank " + std::to_string(shape.size()) + " is above " + std::to_string(kMaxRank));
  // A full shard is closed before a tensor that would overflow it; a tensor larger than the limit
  // still goes somewhere: into a shard of its own.
  if (shards_.empty() || (shards_.back()->data_bytes() > 0 && shards_.back()->data_bytes() + data.size() > max_shard_bytes_))
    open_shard();
  shards_.back()->add(name, dtype, shape, data);
  weight_map_[name] = shard_paths_.size() - 1;
  total_bytes_ += data.size();
}

void CheckpointWriter::finish() { finish(metadata_); }

void CheckpointWriter::finish(const Metadata& metadata) {
  FS_ASSERT(!finished_, "finish() twice");
  FS_ASSERT(header_reserve_for(names_, metadata, kMaxRank) <= reserve_, "final metadata outgrew the reservation");
  for (const std::string& name : names_)
    if (!weight_map_.count(name))
      throw Error("checkpoint " + dir_.string() + ": tensor '" + name + "' was declared but never added");
  if (shards_.empty()) open_shard();  // no tensors at all: one empty file
  for (auto& shard : shards_) shard->finish(metadata);
  shards_.clear();

  const size_t count = shard_paths_.size();
  std::vector<std::string> final_names;
  for (size_t i = 0; i < count; ++i) {
    final_names.push_back(count == 1 ? std::string("model.safetensors") : shard_name(i, count));
    std::error_code ec;
    fs::rename(shard_paths_[i], dir_ / final_names.back(), ec);
    if (ec) throw Error("cannot rename " + shard_paths_[i].string() + ": " + ec.message());
    shard_paths_[i] = dir_ / final_names.back();
  }
  if (count > 1) {
    nlohmann::json index;
    index["metadata"]["total_size"] = total_bytes_;
    nlohmann::json& weight_map = index["weight_map"] = nlohmann::json::object();
    for (const auto& [name, shard] : weight_map_) weight_map[name] = final_names[shard];
    write_file(dir_ / "model.safetensors.index.json", index.dump(2) + "\n");
  }
  fsync_dir(dir_);
  finished_ = true;
}

}  // namespace fineserve::ckpt
