// safetensors: writer -> reader round trips, views, release(), and every malformed file.
#include "models/checkpoint/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/checkpoint/test_util.h"

namespace fineserve::ckpt {
namespace {

using testing::expect_error;
using testing::random_bytes;
using testing::safetensors_bytes;
using testing::TempDir;
using testing::write_bytes;

struct Spec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

uint64_t bytes_of(const Spec& s) { return *tensor_nbytes(s.dtype, s.shape); }

// Writes `specs` with random contents through SafetensorsWriter; returns the contents.
std::vector<std::vector<std::byte>> write_file(const std::filesystem::path& path, const std::vector<Spec>& specs,
                                               const Metadata& metadata, uint32_t seed) {
  std::vector<std::string> names;
  for (const Spec& s : specs) names.push_back(s.name);
  SafetensorsWriter writer(path, header_reserve_for(names, metadata));
  std::vector<std::vector<std::byte>> contents;
  for (const Spec& s : specs) {
    contents.push_back(random_bytes(bytes_of(s), seed++));
    writer.add(s.name, s.dtype, s.shape, contents.back());
  }
  writer.finish(metadata);
  return contents;
}

TEST(Safetensors, RoundTripEveryDtypeBitExact) {
  TempDir dir;
  const std::vector<Spec> specs = {
      {"f32", DType::F32, {3, 5}},      {"f16", DType::F16, {7}},         {"bf16", DType::BF16, {2, 3, 5}},
      {"i8", DType::I8, {769}},         {"u8", DType::U8, {1, 1, 3}},     {"i32", DType::I32, {4, 1}},
      {"scalar", DType::F32, {}},       {"empty", DType::F16, {0, 4}},    {"empty2", DType::I32, {3, 0}},
      {"layers.0.w", DType::BF16, {1}}, {"zz.last", DType::U8, {0}},
  };
  const Metadata metadata = {{"format", "pt"}, {"fineserve.group_size", "128"}, {"quote\"\n\x01", "ünï\tcode"}};
  const auto path = dir / "model.safetensors";
  const auto contents = write_file(path, specs, metadata, 7);

  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->metadata(), metadata);
  ASSERT_EQ(file->tensors().size(), specs.size());
  // The data buffer starts 64-byte aligned in the file.
  EXPECT_EQ((8 + file->header_json().size()) % 64, 0u);
  EXPECT_EQ(file->file_size(), 8 + file->header_json().size() + [&] {
    uint64_t n = 0;
    for (const Spec& s : specs) n += bytes_of(s);
    return n;
  }());
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorInfo* t = file->find(specs[i].name);
    ASSERT_NE(t, nullptr) << specs[i].name;
    EXPECT_EQ(t->dtype, specs[i].dtype);
    EXPECT_EQ(t->shape, specs[i].shape);
    const TensorView v = file->view(*t);
    EXPECT_EQ(v.name(), specs[i].name);
    ASSERT_EQ(v.nbytes(), contents[i].size());
    EXPECT_EQ(v.numel(), static_cast<int64_t>(contents[i].size() / dtype_size(specs[i].dtype)));
    if (v.nbytes() > 0) {
      EXPECT_EQ(std::memcmp(v.data, contents[i].data(), v.nbytes()), 0) << specs[i].name;
    }
  }
  // Tensors come back sorted by offset, which here is the written order.
  for (size_t i = 0; i + 1 < file->tensors().size(); ++i)
    EXPECT_LE(file->tensors()[i].begin, file->tensors()[i + 1].begin);
  EXPECT_EQ(file->find("absent"), nullptr);
}

TEST(Safetensors, NoTensorsAndNoMetadata) {
  TempDir dir;
  write_file(dir / "e.safetensors", {}, {}, 1);
  const auto file = SafetensorsFile::open(dir / "e.safetensors");
  EXPECT_TRUE(file->tensors().empty());
  EXPECT_TRUE(file->metadata().empty());
  EXPECT_EQ(file->header_json().front(), '{');
}

TEST(Safetensors, UnalignedViews) {
  TempDir dir;
  // Odd-sized tensors first push the F32 / I32 ones off 4-byte alignment.
  const std::vector<Spec> specs = {{"a", DType::U8, {3}}, {"b", DType::F32, {5}}, {"c", DType::I8, {1}},
                                   {"d", DType::I32, {3, 3}}, {"e", DType::F16, {3}}, {"f", DType::F32, {2}}};
  const auto contents = write_file(dir / "u.safetensors", specs, {}, 99);
  const auto file = SafetensorsFile::open(dir / "u.safetensors");
  int unaligned = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorView v = file->view(*file->find(specs[i].name));
    unaligned += reinterpret_cast<uintptr_t>(v.data) % dtype_size(v.dtype()) != 0;
    // Read element by element through memcpy, as a consumer of unaligned data must.
    for (int64_t e = 0; e < v.numel(); ++e) {
      const size_t sz = dtype_size(v.dtype());
      EXPECT_EQ(std::memcmp(v.data + e * sz, contents[i].data() + e * sz, sz), 0);
    }
  }
  EXPECT_GE(unaligned, 2);
}

TEST(Safetensors, HeaderOrderIsNotOffsetOrder) {
  TempDir dir;
  // Entries listed out of offset order, a gap, and empty tensors sharing offsets (one inside b).
  const std::string header =
      R"({"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]},)"
      R"("e1":{"dtype":"F32","shape":[0],"data_offsets":[6,6]},)"
      R"("e2":{"dtype":"F32","shape":[0,9],"data_offsets":[8,8]},)"
      R"("e3":{"dtype":"I8","shape":[0],"data_offsets":[8,8]},)"
      R"("a":{"dtype":"U8","shape":[2,1],"data_offsets":[0,2]},)"
      R"("__metadata__":{"k":"v"}})";
  write_bytes(dir / "o.safetensors", safetensors_bytes(header + "    ", "ABCDEFGHIJ"));
  const auto file = SafetensorsFile::open(dir / "o.safetensors");
  std::vector<std::string> order;
  for (const TensorInfo& t : file->tensors()) order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"a", "b", "e1", "e2", "e3"}));
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(file->view(*file->find("b")).data), 4), "EFGH");
  EXPECT_EQ(file->metadata().at("k"), "v");
}

// Resident bytes of the mapping that contains `addr`, from /proc/self/smaps; -1 when unknown.
long resident_kb(const void* addr) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool in_mapping = false;
  const auto a = reinterpret_cast<uintptr_t>(addr);
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-' && line.find(' ') != std::string::npos &&
        line.find(':') > line.find(' ')) {
      in_mapping = lo <= a && a < hi;
      continue;
    }
    if (in_mapping && line.rfind("Rss:", 0) == 0) return std::stol(line.substr(4));
  }
  return -1;
}

TEST(Safetensors, ReleaseDropsResidentPagesAndKeepsData) {
  TempDir dir;
  const std::vector<Spec> specs = {{"head", DType::U8, {3}}, {"big", DType::F32, {1 << 20}}, {"tail", DType::U8, {5}}};
  const auto contents = write_file(dir / "r.safetensors", specs, {}, 5);
  const auto file = SafetensorsFile::open(dir / "r.safetensors");
  const TensorInfo& big = *file->find("big");
  const TensorView v = file->view(big);
  uint64_t sum = 0;
  for (uint64_t i = 0; i < v.nbytes(); i += 512) sum += static_cast<uint8_t>(v.data[i]);  // fault every page in
  const long before = resident_kb(v.data);
  if (before < 0) GTEST_SKIP() << "no /proc/self/smaps";
  EXPECT_GE(before, 4000) << sum;
  file->release(big);
  EXPECT_LT(resident_kb(v.data), before / 8);  // only the header and the two edge pages remain
  // The mapping is still valid: the bytes fault back in from the file, and neighbours are intact.
  EXPECT_EQ(std::memcmp(v.data, contents[1].data(), v.nbytes()), 0);
  for (const char* name : {"head", "tail"}) {
    const TensorView n = file->view(*file->find(name));
    file->release(*file->find(name));  // smaller than a page: nothing to drop, must not disturb anything
    EXPECT_EQ(std::memcmp(n.data, contents[name[0] == 'h' ? 0 : 2].data(), n.nbytes()), 0);
  }
}

// ---- writer errors ----------------------------------------------------------------------------

TEST(SafetensorsWriter, RejectsBadTensors) {
  TempDir dir;
  const auto path = dir / "w.safetensors";
  SafetensorsWriter writer(path, header_reserve_for({"a"}, {}));
  const auto data = random_bytes(12, 1);
  const std::string p = path.string();
  expect_error([&] { writer.add("a", DType::F32, {2}, data); }, {p, "'a'", "12 bytes", "needs 8"});
  expect_error([&] { writer.add("a", DType::F32, {-3}, data); }, {p, "'a'", "invalid shape [-3]"});
  expect_error([&] { writer.add("__metadata__", DType::U8, {12}, data); }, {p, "reserved"});
  expect_error([&] { writer.add("", DType::U8, {12}, data); }, {p, "empty tensor name"});
  expect_error([&] { writer.add("bad\xff", DType::U8, {12}, data); }, {p, "UTF-8"});
  try {
    writer.add("bad\xff", DType::U8, {12}, data);
  } catch (const Error& e) {
    EXPECT_NO_THROW((void)nlohmann::json(std::string(e.what())).dump()) << "message is not valid UTF-8";
  }
  writer.add("a", DType::F32, {3}, data);
  expect_error([&] { writer.add("a", DType::F32, {3}, data); }, {p, "'a'", "added twice"});
  writer.finish({});
  EXPECT_EQ(SafetensorsFile::open(path)->tensors().size(), 1u);
}

TEST(SafetensorsWriter, UnfinishedFileIsRejectedByReaders) {
  TempDir dir;
  const auto path = dir / "partial.safetensors";
  {
    SafetensorsWriter writer(path, 100);
    writer.add("x", DType::U8, {4}, random_bytes(4, 3));
  }  // destroyed without finish()
  ASSERT_TRUE(std::filesystem::exists(path));
  expect_error([&] { SafetensorsFile::open(path); }, {path.string(), "does not start with '{'"});
}

TEST(SafetensorsWriter, ReportsMissingDirectoryAndFullDisk) {
  TempDir dir;
  const auto missing = dir / "no/such/dir/x.safetensors";
  expect_error([&] { SafetensorsWriter w(missing, 64); }, {missing.string(), "No such file or directory"});
  if (!std::filesystem::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  expect_error([&] { SafetensorsWriter w("/dev/full", 64); }, {"/dev/full", "No space left on device"});
}

TEST(SafetensorsWriter, ReserveBoundsWorstCaseNamesShapesAndMetadata) {
  TempDir dir;
  // Control characters escape to \u00XX (6x); empty tensors allow the widest dims on disk.
  const int64_t big = std::numeric_limits<int64_t>::max();
  std::vector<std::string> names;
  for (int i = 0; i < 20; ++i) names.push_back(std::string(static_cast<size_t>(i + 1), '\x01') + std::to_string(i));
  const Metadata metadata = {{std::string(30, '\x02'), std::string(50, '\x1f')}, {"k", std::string(9, '"')}};
  const auto path = dir / "wide.safetensors";
  SafetensorsWriter writer(path, header_reserve_for(names, metadata));
  for (const std::string& n : names) writer.add(n, DType::BF16, {big, big, big, 0}, {});
  writer.finish(metadata);
  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->tensors().size(), names.size());
  EXPECT_EQ(file->metadata(), metadata);
  EXPECT_EQ(file->find(names[3])->shape, (std::vector<int64_t>{big, big, big, 0}));
  EXPECT_EQ(file->find(names[3])->numel(), 0);
}

// ---- malformed files --------------------------------------------------------------------------

class BadFile : public ::testing::Test {
 protected:
  // Writes the header (and data) as a file and expects open() to fail naming the file and `parts`.
  void expect_bad(const std::string& header, const std::string& data, std::initializer_list<std::string> parts) {
    write_bytes(path_, safetensors_bytes(header, data));
    expect_open_error(parts);
  }
  void expect_open_error(std::initializer_list<std::string> parts) {
    expect_error([&] { SafetensorsFile::open(path_); }, {path_.string()});
    expect_error([&] { SafetensorsFile::open(path_); }, parts);
  }
  TempDir dir_;
  std::filesystem::path path_ = dir_ / "bad.safetensors";
};

TEST_F(BadFile, TruncatedBelowEightBytes) {
  write_bytes(path_, "");
  expect_open_error({"truncated: 0 bytes, need at least 8"});
  write_bytes(path_, std::string("\x05\0\0\0\0", 5));
  expect_open_error({"truncated: 5 bytes, need at least 8"});
}

TEST_F(BadFile, HeaderLengthPastEnd) {
  write_bytes(path_, safetensors_bytes("{}", "", 1000));
  expect_open_error({"header length 1000 runs past end of file (size 10)"});
  write_bytes(path_, safetensors_bytes("{}", "", 200ull << 20));
  expect_open_error({"header length 209715200"});
  write_bytes(path_, safetensors_bytes("{}", "", 1));
  expect_open_error({"header length 1"});
  write_bytes(path_, safetensors_bytes("{}", "", ~0ull));
  expect_open_error({"header length 18446744073709551615"});
}

TEST_F(BadFile, HeaderNotJson) {
  expect_bad("{\"a\": ", "", {"not valid JSON"});
  expect_bad("{} trailing", "", {"not valid JSON"});
  expect_bad(std::string("{}\0\0", 4), "", {"not valid JSON"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[1e400],"data_offsets":[0,0]}})", "", {"not valid JSON", "overflow"});
  expect_bad("{\"w\": \"\xff\"}", "", {"not valid JSON"});  // not UTF-8
  expect_bad("   {}", "", {"does not start with '{'"});
  expect_bad("[1, 2]", "", {"does not start with '{'"});
}

TEST_F(BadFile, HeaderNotAnObject) {
  // A file header must start with '{', so this check is reached through parse_header.
  expect_error([] { parse_header("[1, 2]", 0, "x.safetensors"); }, {"x.safetensors", "must be a JSON object"});
  expect_error([] { parse_header("\"s\"", 0, "x.safetensors"); }, {"x.safetensors", "must be a JSON object"});
}

TEST_F(BadFile, EntryDefects) {
  const std::string d16(16, 'x');
  expect_bad(R"({"w":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", d16, {"'w'", "unknown dtype 'F64'"});
  expect_bad(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", d16, {"'w'", "\"dtype\" must be a string"});
  expect_bad(R"({"w":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,8]}})", d16, {"'w'", "\"shape\"", "[-1,2]"});
  expect_bad(R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", d16, {"'w'", "\"shape\""});
  expect_bad(R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", d16, {"'w'", "\"shape\""});
  expect_bad(R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", d16, {"'w'", "\"shape\""});
  expect_bad(R"({"w":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,8]}})", d16,
             {"'w'", "\"shape\""});
  expect_bad(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", d16,
             {"'w'", "too large"});
  expect_bad(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d16,
             {"'w'", "span 8 bytes", "shape [3] of F32 needs 12"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[8],"data_offsets":[12,20]}})", d16,
             {"'w'", "[12, 20] run past the end of the data (16 bytes)"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", d16, {"'w'", "begin after end"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[-1,4]}})", d16, {"'w'", "data_offsets"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[4]}})", d16, {"'w'", "data_offsets"});
  expect_bad(R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"extra":1}})", d16, {"'w'", "unknown key 'extra'"});
  expect_bad(R"({"w":{"shape":[4],"data_offsets":[0,4]}})", d16, {"'w'", "missing \"dtype\""});
  expect_bad(R"({"w":{"dtype":"U8","data_offsets":[0,4]}})", d16, {"'w'", "missing \"shape\""});
  expect_bad(R"({"w":{"dtype":"U8","shape":[4]}})", d16, {"'w'", "missing \"data_offsets\""});
  expect_bad(R"({"w":[1,2]})", d16, {"'w'", "entry must be an object"});
}

TEST_F(BadFile, HugeNamesAreClippedToValidUtf8) {
  std::string name;
  for (int i = 0; i < 300; ++i) name += "\xc3\xa9";  // é, two bytes each
  write_bytes(path_, safetensors_bytes(R"({")" + name + R"(":{"dtype":"F64","shape":[],"data_offsets":[0,0]}})"));
  try {
    SafetensorsFile::open(path_);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("unknown dtype"), std::string::npos) << msg;
    EXPECT_LT(msg.size(), path_.string().size() + 200);
    EXPECT_NO_THROW((void)nlohmann::json(msg).dump()) << "message is not valid UTF-8";
  }
}

TEST_F(BadFile, OverlapsAndDuplicates) {
  const std::string d16(16, 'x');
  expect_bad(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}})",
             d16, {"'a' [0, 8)", "'b' [4, 12)", "overlap"});
  // b lies inside a: caught against the furthest end, not just the previous tensor.
  expect_bad(R"({"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},)"
             R"("c":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
             d16, {"overlap", "'a' [0, 16)"});
  expect_bad(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
             d16, {"repeats the key 'a'"});
}

TEST_F(BadFile, Metadata) {
  expect_bad(R"({"__metadata__":{"k":1}})", "", {"\"__metadata__\" value of 'k' must be a string"});
  expect_bad(R"({"__metadata__":{"k":null}})", "", {"'k' must be a string"});
  expect_bad(R"({"__metadata__":["k"]})", "", {"\"__metadata__\" must be an object"});
}

TEST(ParseFileBytes, MatchesOpen) {
  const std::string bytes = safetensors_bytes(R"({"t":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})", "01234567");
  const auto parsed =
      parse_file_bytes(std::as_bytes(std::span<const char>(bytes.data(), bytes.size())), "mem");
  EXPECT_EQ(parsed.data_start, bytes.size() - 8);
  ASSERT_EQ(parsed.header.tensors.size(), 1u);
  EXPECT_EQ(parsed.header.tensors[0].numel(), 2);
}

TEST(TensorNbytes, OverflowAndZeroDims) {
  EXPECT_EQ(tensor_nbytes(DType::F32, {}), 4u);
  EXPECT_EQ(tensor_nbytes(DType::BF16, {3, 0, 5}), 0u);
  EXPECT_EQ(tensor_nbytes(DType::I32, {-1}), std::nullopt);
  EXPECT_EQ(tensor_nbytes(DType::U8, {int64_t{1} << 61, 2}), uint64_t{1} << 62);
  EXPECT_EQ(tensor_nbytes(DType::U8, {int64_t{1} << 62, 4}), std::nullopt);           // numel past int64
  EXPECT_EQ(tensor_nbytes(DType::F32, {int64_t{1} << 62, 1}), std::nullopt);          // bytes past uint64
  EXPECT_EQ(tensor_nbytes(DType::F32, {std::numeric_limits<int64_t>::max(), 0}), 0u);  // empty wins
}

}  // namespace
}  // namespace fineserve::ckpt
