// Checkpoint: one .safetensors file, or a directory of them (sharded with an index, or not).
#include <algorithm>
#include <map>
#include <system_error>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"

namespace fineserve::ckpt {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

// The index's weight_map grouped by shard: shard file name -> tensors the index puts there.
std::map<std::string, std::vector<std::string>> read_index(const fs::path& index_path) {
  const std::string label = index_path.string();
  const json index = read_json_file(index_path);
  if (!index.is_object()) throw Error(label + ": must be a JSON object");
  const auto it = index.find("weight_map");
  if (it == index.end() || !it->is_object()) throw Error(label + ": \"weight_map\" must be an object");
  std::map<std::string, std::vector<std::string>> shards;
  for (const auto& [tensor, shard] : it->items()) {
    if (!shard.is_string())
      throw Error(label + ": weight_map entry of tensor '" + tensor + "' must be a file name string, got " +
                  shard.dump());
    const auto& name = shard.get_ref<const std::string&>();
    // Shards sit beside the index; a path could reach outside the checkpoint.
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
      throw Error(label + ": weight_map maps tensor '" + tensor + "' to '" + name + "', which is not a file name");
    shards[name].push_back(tensor);
  }
  if (shards.empty()) throw Error(label + ": \"weight_map\" lists no tensors");
  return shards;
}

}  // namespace

void Checkpoint::add_file(std::unique_ptr<SafetensorsFile> file) {
  const size_t index = files_.size();
  for (const TensorInfo& t : file->tensors()) {
    const auto [it, inserted] = owner_.emplace(t.name, index);
    if (!inserted)
      throw Error("checkpoint " + source_.string() + ": tensor '" + t.name + "' is in both " +
                  files_[it->second]->path().string() + " and " + file->path().string());
  }
  files_.push_back(std::move(file));
}

Checkpoint Checkpoint::open(const fs::path& path) {
  Checkpoint c;
  c.source_ = path;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (fs::is_regular_file(st)) {
    c.dir_ = path.has_parent_path() ? path.parent_path() : fs::path(".");
    c.add_file(SafetensorsFile::open(path));
    return c;
  }
  if (!fs::is_directory(st)) {
    if (!fs::exists(st)) throw Error("checkpoint " + path.string() + ": no such file or directory");
    throw Error("checkpoint " + path.string() + ": neither a file nor a directory");
  }
  c.dir_ = path;

  const fs::path index_path = path / kIndexName;
  if (fs::exists(index_path)) {
    const std::string label = index_path.string();
    const auto shards = read_index(index_path);
    for (const auto& [shard_name, listed] : shards) {  // sorted: model-00001-of-... first
      const fs::path shard_path = path / shard_name;
      if (!fs::is_regular_file(shard_path, ec))
        throw Error(label + ": shard " + shard_name + " (holding tensor '" + listed.front() + "') does not exist");
      auto file = SafetensorsFile::open(shard_path);
      for (const std::string& tensor : listed)
        if (!file->find(tensor))
          throw Error(label + ": maps tensor '" + tensor + "' to shard " + shard_name + ", which does not contain it");
      if (file->tensors().size() != listed.size()) {  // the shard holds a tensor the index puts elsewhere
        for (const TensorInfo& t : file->tensors()) {
          if (std::find(listed.begin(), listed.end(), t.name) != listed.end()) continue;
          std::string elsewhere = "does not list it";
          for (const auto& [other_name, other_listed] : shards)
            if (std::find(other_listed.begin(), other_listed.end(), t.name) != other_listed.end())
              elsewhere = "maps it to shard " + other_name;
          throw Error(label + ": shard " + shard_name + " holds tensor '" + t.name + "' but the index " + elsewhere);
        }
      }
      c.add_file(std::move(file));
    }
    return c;
  }

  if (fs::exists(path / kSingleName)) {
    c.add_file(SafetensorsFile::open(path / kSingleName));
    return c;
  }

  std::vector<fs::path> found;
  for (const fs::directory_entry& entry : fs::directory_iterator(path, ec))
    if (entry.path().extension() == ".safetensors" && fs::is_regular_file(entry.status()))  // follows symlinks
      found.push_back(entry.path());
  if (ec) throw Error("checkpoint " + path.string() + ": cannot list directory: " + ec.message());
  if (found.empty()) throw Error("no .safetensors files in " + path.string());
  std::sort(found.begin(), found.end());
  for (const fs::path& p : found) c.add_file(SafetensorsFile::open(p));
  return c;
}

std::vector<const TensorInfo*> Checkpoint::tensors() const {
  std::vector<const TensorInfo*> all;
  all.reserve(owner_.size());
  for (const auto& file : files_)
    for (const TensorInfo& t : file->tensors()) all.push_back(&t);
  return all;
}

bool Checkpoint::has(std::string_view name) const { return owner_.find(name) != owner_.end(); }

const TensorInfo* Checkpoint::find(std::string_view name) const {
  const auto it = owner_.find(name);
  return it == owner_.end() ? nullptr : files_[it->second]->find(name);
}

const SafetensorsFile& Checkpoint::file_of(std::string_view name) const {
  const auto it = owner_.find(name);
  if (it == owner_.end()) throw Error("checkpoint " + source_.string() + ": missing tensor " + std::string(name));
  return *files_[it->second];
}

TensorView Checkpoint::get(std::string_view name) const {
  const SafetensorsFile& file = file_of(name);
  return file.view(*file.find(name));
}

const Metadata& Checkpoint::metadata() const {
  static const Metadata empty;
  return files_.empty() ? empty : files_.front()->metadata();
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t total = 0;
  for (const auto& file : files_) total += file->file_size();
  return total;
}

}  // namespace fineserve::ckpt
