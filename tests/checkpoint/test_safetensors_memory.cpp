// SafetensorsFile::build_in_memory and Checkpoint::from_files: a safetensors image built in
// anonymous memory reads like a file (same header validation, same views), and the image itself
// is a valid file (written out byte for byte, SafetensorsFile::open accepts it).
#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kernels/base.h"
#include "models/checkpoint/safetensors.h"
#include "tests/checkpoint/test_util.h"

namespace fineserve::ckpt {
namespace {

using testing::TempDir;

// Fills every tensor with bytes that depend on its name and position, so that a misplaced tensor
// or a skipped fill shows.
void fill_pattern(const TensorInfo& info, std::byte* bytes) {
  for (uint64_t i = 0; i < info.nbytes(); ++i)
    bytes[i] = static_cast<std::byte>((i * 31 + info.name.size() * 7 + 1) & 0xff);
}

std::vector<TensorDecl> awkward_tensors() {
  return {{"a.weight", DType::F16, {3, 5}},  // 30 bytes: the next tensor starts unaligned
          {"b", DType::I8, {7}},
          {"empty", DType::F32, {0, 4}},
          {"c.scales", DType::F32, {1, 3}},
          {"d", DType::U8, {2, 3, 1}},
          {"big", DType::F32, {3, 5000}}};  // spans whole pages (what release() could drop)
}

TEST(SafetensorsMemory, ViewsHoldWhatFillWrote) {
  const Metadata meta{{"format", "pt"}, {"note", "in memory"}};
  size_t calls = 0;
  std::vector<std::string> order;
  auto file = SafetensorsFile::build_in_memory("mem:test", awkward_tensors(), meta,
                                               [&](const TensorInfo& info, std::byte* bytes) {
                                                 ++calls;
                                                 order.push_back(info.name);
                                                 fill_pattern(info, bytes);
                                               });
  EXPECT_EQ(calls, 6u);
  EXPECT_EQ(order, (std::vector<std::string>{"a.weight", "b", "empty", "c.scales", "d", "big"}));  // as declared
  EXPECT_TRUE(file->in_memory());
  EXPECT_EQ(file->path(), "mem:test");
  EXPECT_EQ(file->metadata(), meta);
  ASSERT_EQ(file->tensors().size(), 6u);
  uint64_t expected_offset = 0;
  for (const TensorDecl& d : awkward_tensors()) {
    const TensorInfo* t = file->find(d.name);
    ASSERT_NE(t, nullptr) << d.name;
    EXPECT_EQ(t->dtype, d.dtype);
    EXPECT_EQ(t->shape, d.shape);
    EXPECT_EQ(t->begin, expected_offset) << d.name << ": tensors are laid out back to back";
    expected_offset = t->end;
    const TensorView v = file->view(*t);
    std::vector<std::byte> want(t->nbytes());
    fill_pattern(*t, want.data());
    EXPECT_TRUE(std::equal(want.begin(), want.end(), v.data)) << d.name;
  }
  // The data starts on a 64-byte boundary of the image.
  EXPECT_EQ((8 + file->header_json().size()) % 64, 0u);
  // release() must not zero an in-memory tensor (there is no file to read it back from).
  const TensorInfo* big = file->find("big");
  file->release(*big);
  std::vector<std::byte> want(big->nbytes());
  fill_pattern(*big, want.data());
  EXPECT_TRUE(std::equal(want.begin(), want.end(), file->view(*big).data));
}

TEST(SafetensorsMemory, ImageIsAValidFile) {
  TempDir dir;
  auto mem = SafetensorsFile::build_in_memory("mem:test", awkward_tensors(), {{"k", "v"}}, fill_pattern);
  // The whole image: the length prefix, the header, the data.
  const uint64_t header_len = mem->header_json().size();
  std::string image(8, '\0');
  for (int i = 0; i < 8; ++i) image[static_cast<size_t>(i)] = static_cast<char>((header_len >> (8 * i)) & 0xff);
  image += std::string(mem->header_json());
  const TensorView first = mem->view(*mem->find("a.weight"));
  image.append(reinterpret_cast<const char*>(first.data), mem->file_size() - 8 - header_len);
  ASSERT_EQ(image.size(), mem->file_size());
  testing::write_bytes(dir / "model.safetensors", image);

  const Checkpoint disk = Checkpoint::open(dir.path());
  EXPECT_FALSE(disk.files().front()->in_memory());
  EXPECT_EQ(disk.metadata(), mem->metadata());
  for (const TensorInfo& t : mem->tensors()) {
    const TensorView v = disk.get(t.name);
    EXPECT_EQ(v.shape(), t.shape);
    EXPECT_EQ(v.dtype(), t.dtype);
    EXPECT_TRUE(std::equal(v.data, v.data + v.nbytes(), mem->view(t).data)) << t.name;
  }
}

TEST(SafetensorsMemory, CheckpointFromFiles) {
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  files.push_back(SafetensorsFile::build_in_memory("mem:0", {{"x", DType::F32, {2}}}, {{"format", "pt"}}, fill_pattern));
  files.push_back(SafetensorsFile::build_in_memory("mem:1", {{"y", DType::I8, {3}}}, {}, fill_pattern));
  const Checkpoint c = Checkpoint::from_files("synthetic:test", std::move(files));
  EXPECT_EQ(c.dir(), "synthetic:test");
  EXPECT_TRUE(c.has("x"));
  EXPECT_TRUE(c.has("y"));
  EXPECT_EQ(c.metadata().at("format"), "pt");
  EXPECT_EQ(c.get("y").nbytes(), 3u);
  EXPECT_EQ(c.tensors().size(), 2u);
  try {
    (void)c.get("z");
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("synthetic:test"), std::string::npos) << e.what();
  }

  // The same tensor in two files.
  std::vector<std::unique_ptr<SafetensorsFile>> dup;
  dup.push_back(SafetensorsFile::build_in_memory("mem:0", {{"x", DType::F32, {2}}}, {}, fill_pattern));
  dup.push_back(SafetensorsFile::build_in_memory("mem:1", {{"x", DType::F32, {2}}}, {}, fill_pattern));
  EXPECT_THROW((void)Checkpoint::from_files("synthetic:dup", std::move(dup)), Error);
}

TEST(SafetensorsMemory, BadDeclarationsAreErrors) {
  EXPECT_THROW((void)SafetensorsFile::build_in_memory("mem", {{"x", DType::F16, {2}}, {"x", DType::F16, {3}}}, {},
                                                      fill_pattern),
               Error);
  EXPECT_THROW((void)SafetensorsFile::build_in_memory("mem", {{"__metadata__", DType::F16, {2}}}, {}, fill_pattern),
               Error);
  EXPECT_THROW((void)SafetensorsFile::build_in_memory("mem", {{"x", DType::F16, {-1}}}, {}, fill_pattern), Error);
  const int64_t huge = int64_t{1} << 62;
  EXPECT_THROW((void)SafetensorsFile::build_in_memory("mem", {{"x", DType::F32, {huge, 4}}}, {}, fill_pattern), Error);
  // Each fits in 64 bits of offset alone, but not both together.
  EXPECT_THROW((void)SafetensorsFile::build_in_memory(
                   "mem", {{"x", DType::F16, {huge}}, {"y", DType::F16, {huge}}}, {}, fill_pattern),
               Error);
  // More memory than any address space: mmap fails, and says so.
  try {
    (void)SafetensorsFile::build_in_memory("mem:big", {{"x", DType::U8, {huge}}}, {}, fill_pattern);
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot allocate"), std::string::npos) << e.what();
  }
  // No fill: an all-zero image, still valid.
  auto zeros = SafetensorsFile::build_in_memory("mem", {{"x", DType::I32, {4}}}, {}, nullptr);
  const TensorView v = zeros->view(*zeros->find("x"));
  for (uint64_t i = 0; i < v.nbytes(); ++i) EXPECT_EQ(v.data[i], std::byte{0});
}

}  // namespace
}  // namespace fineserve::ckpt
