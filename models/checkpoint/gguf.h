// GGUF (llama.cpp's model file format): a validating, memory-mapped reader and dequantization of
// the common tensor types to fp32 (ggml's reference formulas, block by block).
//
// File layout (little-endian; versions 2 and 3):
//   u32 magic "GGUF", u32 version, u64 tensor_count, u64 metadata_kv_count,
//   metadata_kv_count x { string key, u32 value_type, value },
//   tensor_count x { string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset },
//   padding to general.alignment (default 32), then the tensor data; each tensor's offset is
//   relative to the start of the data and a multiple of the alignment.
// A string is u64 length + bytes; an array is u32 element type + u64 count + elements.
// dims[0] is the fastest-varying dimension: a [rows, cols] matrix is stored with dims {cols, rows}.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace fineserve::ckpt::gguf {

enum class ValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, Bool = 7, String = 8, Array = 9,
  U64 = 10, I64 = 11, F64 = 12,
};
std::string_view value_type_name(ValueType t);

// ggml tensor types, numbered as ggml numbers them.
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35,
};

// Elements per block and bytes per block of a ggml type; nullopt for a number ggml does not define.
struct BlockLayout {
  std::string_view name;
  int64_t block_elems = 1;
  int64_t block_bytes = 0;
};
std::optional<BlockLayout> block_layout(uint32_t type);
// "Q4_K", or "type 123" for an unknown number.
std::string ggml_type_name(uint32_t type);

// A metadata value. Integers of every width are held as int64 (u64 values above INT64_MAX as
// uint64), floats as double; `type` keeps the stored type.
struct Value {
  ValueType type = ValueType::U8;
  ValueType elem_type = ValueType::U8;  // arrays only
  std::variant<int64_t, uint64_t, double, bool, std::string, std::vector<Value>> data;

  bool is_integer() const;
  bool is_number() const { return is_integer() || type == ValueType::F32 || type == ValueType::F64; }
  bool is_array() const { return type == ValueType::Array; }
  // Typed reads; throw fineserve::Error naming `what` (e.g. "model.gguf: key llama.block_count")
  // when the value is not of that kind (or does not fit).
  int64_t as_int(const std::string& what) const;
  double as_double(const std::string& what) const;
  bool as_bool(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  const std::vector<Value>& as_array(const std::string& what) const;
  // A short text rendering for messages and `inspect` (long arrays abbreviated).
  std::string to_string() const;
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // as stored: dims[0] fastest-varying
  uint32_t type = 0;          // a GgmlType number
  uint64_t offset = 0;        // from the start of the data section
  uint64_t nbytes = 0;
  int64_t numel = 0;

  // Row-major shape (dims reversed): what the same tensor is in a Hugging Face checkpoint.
  std::vector<int64_t> shape() const { return {dims.rbegin(), dims.rend()}; }
};

struct Header {
  uint32_t version = 0;
  uint64_t alignment = 32;
  uint64_t data_start = 0;  // file offset of the data section
  std::vector<std::pair<std::string, Value>> metadata;  // in file order
  std::vector<TensorInfo> tensors;                      // in file order

  const Value* find(std::string_view key) const;  // nullptr when absent
  const TensorInfo* find_tensor(std::string_view name) const;
};

// Parses and validates a whole GGUF file held in `file`: magic, version (2 or 3), every count and
// length against the bytes left, value and ggml types known, dims positive and at most 4, sizes
// overflow-checked, the alignment a power of two, tensor names unique, each tensor's data aligned,
// inside the file and overlapping no other. Throws fineserve::Error naming `label` and the key or
// tensor at fault.
Header parse(std::span<const std::byte> file, const std::string& label);

class File {
 public:
  // Maps the file read-only and parses it. Throws fineserve::Error on any defect.
  static std::unique_ptr<File> open(const std::filesystem::path& path);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const Header& header() const { return header_; }
  const Value* find(std::string_view key) const { return header_.find(key); }
  // The tensor's bytes (valid while the file is open).
  std::span<const std::byte> data(const TensorInfo& t) const;
  // Drops the tensor's pages from this process's resident set once converted.
  void release(const TensorInfo& t) const;

 private:
  File() = default;
  std::filesystem::path path_;
  const std::byte* base_ = nullptr;
  uint64_t size_ = 0;
  Header header_;
};

// Whether dequantize() handles the type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
// Q6_K (the types of llama.cpp's common Q4_0 ... Q8_0 and Q4_K_M / Q5_K_M / Q6_K files).
bool can_dequantize(uint32_t type);
// Decodes `n` elements (a multiple of the type's block size) stored as `type` from `src` (which
// holds exactly their bytes) into dst[n]. Throws fineserve::Error naming `what` for a type it
// does not handle.
void dequantize(uint32_t type, std::span<const std::byte> src, int64_t n, float* dst, const std::string& what);

}  // namespace fineserve::ckpt::gguf
