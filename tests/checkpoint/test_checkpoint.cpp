// Checkpoint (directories, sharded indexes) and CheckpointWriter.
#include <cstring>
#include <map>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "models/checkpoint/config.h"
#include "models/checkpoint/safetensors.h"
#include "tests/checkpoint/test_util.h"

namespace fineserve::ckpt {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;
using testing::random_bytes;
using testing::TempDir;
using testing::write_bytes;

// Writes a small safetensors file holding U8 tensors `names`, each of `size` random bytes.
void write_shard(const fs::path& path, const std::vector<std::string>& names, const Metadata& metadata = {},
                 int64_t size = 5) {
  SafetensorsWriter writer(path, header_reserve_for(names, metadata));
  uint32_t seed = 11;
  for (const std::string& n : names) writer.add(n, DType::U8, {size}, random_bytes(static_cast<size_t>(size), seed++));
  writer.finish(metadata);
}

void write_index(const fs::path& dir, const std::map<std::string, std::string>& weight_map) {
  nlohmann::json index;
  index["metadata"]["total_size"] = 0;
  index["weight_map"] = weight_map;
  write_bytes(dir / "model.safetensors.index.json", index.dump(2));
}

TEST(Checkpoint, ShardedThroughIndex) {
  TempDir dir;
  write_shard(dir / "model-00001-of-00002.safetensors", {"a", "b"}, {{"k", "v"}});
  write_shard(dir / "model-00002-of-00002.safetensors", {"c"}, {{"k", "v"}});
  write_shard(dir / "stray.safetensors", {"zzz"});  // not in the index: ignored
  write_index(dir.path(), {{"a", "model-00001-of-00002.safetensors"},
                           {"b", "model-00001-of-00002.safetensors"},
                           {"c", "model-00002-of-00002.safetensors"}});
  const Checkpoint c = Checkpoint::open(dir.path());
  EXPECT_EQ(c.dir(), dir.path());
  ASSERT_EQ(c.files().size(), 2u);
  std::vector<std::string> names;
  for (const TensorInfo* t : c.tensors()) names.push_back(t->name);
  EXPECT_EQ(names, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(c.has("c"));
  EXPECT_FALSE(c.has("zzz"));
  EXPECT_EQ(c.file_of("c").path().filename(), "model-00002-of-00002.safetensors");
  EXPECT_EQ(c.get("b").nbytes(), 5u);
  EXPECT_EQ(c.find("c")->dtype, DType::U8);
  EXPECT_EQ(c.find("nope"), nullptr);
  EXPECT_EQ(c.metadata().at("k"), "v");
  EXPECT_EQ(c.total_bytes(), c.files()[0]->file_size() + c.files()[1]->file_size());
  expect_error([&] { c.get("nope"); }, {"checkpoint " + dir.path().string() + ": missing tensor nope"});
  expect_error([&] { c.file_of("nope"); }, {"missing tensor nope"});
}

TEST(Checkpoint, IndexDefects) {
  TempDir dir;
  const std::string index = (dir / "model.safetensors.index.json").string();
  write_shard(dir / "s1.safetensors", {"a", "b"});
  write_shard(dir / "s2.safetensors", {"b", "c"});

  write_index(dir.path(), {{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"x", "missing.safetensors"}});
  expect_error([&] { Checkpoint::open(dir.path()); }, {index, "shard missing.safetensors", "'x'", "does not exist"});

  write_index(dir.path(), {{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"c", "s1.safetensors"}});
  expect_error([&] { Checkpoint::open(dir.path()); }, {index, "maps tensor 'c' to shard s1.safetensors", "does not contain"});

  write_index(dir.path(), {{"a", "s1.safetensors"}});
  expect_error([&] { Checkpoint::open(dir.path()); }, {index, "shard s1.safetensors holds tensor 'b'", "does not list it"});

  // b is in both shards; the index can only put it in one of them.
  write_index(dir.path(), {{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"c", "s2.safetensors"}});
  expect_error([&] { Checkpoint::open(dir.path()); },
               {index, "shard s2.safetensors holds tensor 'b'", "maps it to shard s1.safetensors"});

  write_index(dir.path(), {{"a", "../s1.safetensors"}});
  expect_error([&] { Checkpoint::open(dir.path()); }, {index, "'a'", "not a file name"});

  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": {"a": 3}})");
  expect_error([&] { Checkpoint::open(dir.path()); }, {index, "'a'", "file name"});
  write_bytes(dir / "model.safetensors.index.json", R"({"metadata": {}})");
  expect_error([&] { Checkpoint::open(dir.path()); }, {index, "weight_map"});
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": {}})");
  expect_error([&] { Checkpoint::open(dir.path()); }, {index, "lists no tensors"});
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": )");
  expect_error([&] { Checkpoint::open(dir.path()); }, {index, "invalid JSON at byte"});
}

TEST(Checkpoint, BadShardNamesTheShard) {
  TempDir dir;
  write_bytes(dir / "s1.safetensors", "short");
  write_index(dir.path(), {{"a", "s1.safetensors"}});
  expect_error([&] { Checkpoint::open(dir.path()); }, {(dir / "s1.safetensors").string(), "truncated"});
}

TEST(Checkpoint, SingleFileDirectoryAndGlob) {
  TempDir dir;
  // model.safetensors wins over other files.
  write_shard(dir / "model.safetensors", {"m"});
  write_shard(dir / "other.safetensors", {"o"});
  Checkpoint c = Checkpoint::open(dir.path());
  ASSERT_EQ(c.files().size(), 1u);
  EXPECT_TRUE(c.has("m"));
  EXPECT_FALSE(c.has("o"));

  // Without it: every *.safetensors, sorted by name.
  fs::remove(dir / "model.safetensors");
  write_shard(dir / "a.safetensors", {"x", "y"});
  write_bytes(dir / "notes.txt", "not a checkpoint");
  c = Checkpoint::open(dir.path());
  ASSERT_EQ(c.files().size(), 2u);
  EXPECT_EQ(c.files()[0]->path().filename(), "a.safetensors");
  EXPECT_EQ(c.tensors().size(), 3u);

  // Duplicates across files.
  write_shard(dir / "b.safetensors", {"y"});
  expect_error([&] { Checkpoint::open(dir.path()); }, {"tensor 'y' is in both", "a.safetensors", "b.safetensors"});

  // One file by path.
  const Checkpoint one = Checkpoint::open(dir / "b.safetensors");
  EXPECT_EQ(one.dir(), dir.path());
  EXPECT_TRUE(one.has("y"));
  expect_error([&] { one.get("x"); }, {"b.safetensors: missing tensor x"});
}

TEST(Checkpoint, NothingToOpen) {
  TempDir dir;
  expect_error([&] { Checkpoint::open(dir.path()); }, {"no .safetensors files in " + dir.path().string()});
  expect_error([&] { Checkpoint::open(dir / "absent"); }, {(dir / "absent").string(), "no such file or directory"});
}

// ---- CheckpointWriter -------------------------------------------------------------------------

struct Item {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<std::byte> data;
};

std::vector<Item> make_items() {
  std::vector<Item> items = {{"embed", DType::F16, {37, 3}, {}},   {"l0.w", DType::I8, {5, 7}, {}},
                             {"l0.scale", DType::F16, {5, 1}, {}}, {"l0.empty", DType::I32, {0}, {}},
                             {"l1.w", DType::U8, {200}, {}},       {"l1.b", DType::F32, {3}, {}},
                             {"head", DType::BF16, {11, 2}, {}}};
  uint32_t seed = 40;
  for (Item& it : items) it.data = random_bytes(*tensor_nbytes(it.dtype, it.shape), seed++);
  return items;
}

void write_items(const fs::path& dir, const std::vector<Item>& items, const Metadata& metadata, uint64_t max_shard) {
  std::vector<std::string> names;
  for (const Item& it : items) names.push_back(it.name);
  CheckpointWriter writer(dir, names, metadata, max_shard);
  for (const Item& it : items) writer.add(it.name, it.dtype, it.shape, it.data);
  writer.finish();
}

void expect_items(const Checkpoint& c, const std::vector<Item>& items) {
  EXPECT_EQ(c.tensors().size(), items.size());
  for (const Item& it : items) {
    const TensorView v = c.get(it.name);
    EXPECT_EQ(v.dtype(), it.dtype) << it.name;
    EXPECT_EQ(v.shape(), it.shape) << it.name;
    ASSERT_EQ(v.nbytes(), it.data.size()) << it.name;
    if (!it.data.empty()) {
      EXPECT_EQ(std::memcmp(v.data, it.data.data(), it.data.size()), 0) << it.name;
    }
  }
}

TEST(CheckpointWriter, SingleShard) {
  TempDir dir;
  const auto items = make_items();
  const Metadata metadata = {{"format", "fineserve"}};
  write_items(dir / "out", items, metadata, 1 << 20);
  EXPECT_TRUE(fs::exists(dir / "out/model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "out/model.safetensors.index.json"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir / "out"), fs::directory_iterator{}), 1);
  const Checkpoint c = Checkpoint::open(dir / "out");
  expect_items(c, items);
  EXPECT_EQ(c.metadata(), metadata);
}

TEST(CheckpointWriter, ManyShardsWithIndex) {
  TempDir dir;
  const auto items = make_items();  // 222, 35, 10, 0, 200, 12, 44 bytes
  const Metadata metadata = {{"format", "fineserve"}, {"a", "b"}};
  const uint64_t max_shard = 60;
  write_items(dir.path(), items, metadata, max_shard);

  const auto index = read_json_file(dir / "model.safetensors.index.json");
  uint64_t total = 0;
  for (const Item& it : items) total += it.data.size();
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  const auto& weight_map = index["weight_map"];
  ASSERT_EQ(weight_map.size(), items.size());
  // embed (222 > 60) alone; l0.* (45) together with the empty one; l1.w alone; l1.b + head (56).
  EXPECT_EQ(weight_map.at("embed"), "model-00001-of-00004.safetensors");
  EXPECT_EQ(weight_map.at("l0.w"), "model-00002-of-00004.safetensors");
  EXPECT_EQ(weight_map.at("l0.empty"), "model-00002-of-00004.safetensors");
  EXPECT_EQ(weight_map.at("l1.w"), "model-00003-of-00004.safetensors");
  EXPECT_EQ(weight_map.at("head"), "model-00004-of-00004.safetensors");

  const Checkpoint c = Checkpoint::open(dir.path());
  ASSERT_EQ(c.files().size(), 4u);
  for (const auto& file : c.files()) {
    EXPECT_EQ(file->metadata(), metadata) << file->path();
    uint64_t data = 0;
    for (const TensorInfo& t : file->tensors()) data += t.nbytes();
    EXPECT_TRUE(data <= max_shard || file->tensors().size() == 1) << file->path();
  }
  expect_items(c, items);
  for (const auto& entry : fs::directory_iterator(dir.path()))
    EXPECT_EQ(entry.path().string().find(".partial"), std::string::npos) << entry.path();
}

TEST(CheckpointWriter, EmptyCheckpoint) {
  TempDir dir;
  CheckpointWriter writer(dir.path(), {}, {{"k", "v"}}, 100);
  writer.finish();
  const Checkpoint c = Checkpoint::open(dir.path());
  EXPECT_TRUE(c.tensors().empty());
  EXPECT_EQ(c.metadata().at("k"), "v");
}

TEST(CheckpointWriter, DeclarationsAreEnforced) {
  TempDir dir;
  const std::string d = dir.path().string();
  const auto data = random_bytes(4, 1);
  {
    CheckpointWriter writer(dir.path(), {"a", "b"}, {}, 100);
    writer.add("a", DType::U8, {4}, data);
    expect_error([&] { writer.add("zz", DType::U8, {4}, data); }, {d, "'zz' was not declared"});
    expect_error([&] { writer.add("a", DType::U8, {4}, data); }, {d, "'a' added twice"});
    expect_error([&] { writer.add("b", DType::U8, {1, 1, 1, 1, 1, 1, 1, 1, 4}, data); }, {d, "'b'", "rank 9"});
    expect_error([&] { writer.finish(); }, {d, "'b' was declared but never added"});
  }
  expect_error([&] { CheckpointWriter w(dir.path(), {"a", "c", "a"}, {}, 100); }, {"'a' declared twice"});
}

}  // namespace
}  // namespace fineserve::ckpt
