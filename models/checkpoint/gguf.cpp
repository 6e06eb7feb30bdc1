// GGUF reading: header validation, memory mapping and dequantization.
#include "models/checkpoint/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <set>

#include "kernels/base.h"
#include "kernels/half.h"
#include "models/checkpoint/util.h"

namespace fineserve::ckpt::gguf {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr int kMaxDims = 4;              // GGML_MAX_DIMS
constexpr int kMaxNesting = 8;           // arrays of arrays: a bound on the recursion a file can cause

// A name or key as it may appear in a message: control bytes escaped, long ones cut.
std::string printable(std::string_view s) {
  std::string out;
  for (const char ch : s.substr(0, 96)) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) {
      static const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += ch;
    }
  }
  if (s.size() > 96) out += "...";
  return "'" + out + "'";
}

// Bounds-checked little-endian reads over the file's bytes.
class Cursor {
 public:
  Cursor(std::span<const std::byte> bytes, const std::string& label) : bytes_(bytes), label_(label) {}

  uint64_t pos() const { return pos_; }
  uint64_t left() const { return bytes_.size() - pos_; }

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(label_ + ": " + what + " (at byte " + std::to_string(pos_) + ")");
  }

  template <class T>
  T read(const char* what) {
    if (left() < sizeof(T))
      fail("truncated file: " + std::string(what) + " needs " + std::to_string(sizeof(T)) + " bytes, " +
           std::to_string(left()) + " left");
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const std::string& what) {
    const uint64_t n = read<uint64_t>("a string length");
    if (n > left())
      fail("truncated file: " + what + " claims a string of " + std::to_string(n) + " bytes, " +
           std::to_string(left()) + " left");
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), static_cast<size_t>(n));
    pos_ += n;
    return s;
  }

 private:
  std::span<const std::byte> bytes_;
  const std::string& label_;
  uint64_t pos_ = 0;
};

bool known_value_type(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::F64); }

// The fewest bytes one value of this type takes in a file (bounds array counts before reading).
uint64_t min_value_bytes(ValueType t) {
  switch (t) {
    case ValueType::U8:
    case ValueType::I8:
    case ValueType::Bool: return 1;
    case ValueType::U16:
    case ValueType::I16: return 2;
    case ValueType::U32:
    case ValueType::I32:
    case ValueType::F32: return 4;
    case ValueType::U64:
    case ValueType::I64:
    case ValueType::F64:
    case ValueType::String: return 8;
    case ValueType::Array: return 12;
  }
  return 1;
}

Value read_value(Cursor& c, ValueType type, const std::string& what, int depth) {
  Value v;
  v.type = type;
  switch (type) {
    case ValueType::U8: v.data = static_cast<int64_t>(c.read<uint8_t>(what.c_str())); break;
    case ValueType::I8: v.data = static_cast<int64_t>(c.read<int8_t>(what.c_str())); break;
    case ValueType::U16: v.data = static_cast<int64_t>(c.read<uint16_t>(what.c_str())); break;
    case ValueType::I16: v.data = static_cast<int64_t>(c.read<int16_t>(what.c_str())); break;
    case ValueType::U32: v.data = static_cast<int64_t>(c.read<uint32_t>(what.c_str())); break;
    case ValueType::I32: v.data = static_cast<int64_t>(c.read<int32_t>(what.c_str())); break;
    case ValueType::I64: v.data = c.read<int64_t>(what.c_str()); break;
    case ValueType::U64: {
      const uint64_t u = c.read<uint64_t>(what.c_str());
      if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        v.data = static_cast<int64_t>(u);
      else
        v.data = u;
      break;
    }
    case ValueType::F32: v.data = static_cast<double>(c.read<float>(what.c_str())); break;
    case ValueType::F64: v.data = c.read<double>(what.c_str()); break;
    case ValueType::Bool: {
      const uint8_t b = c.read<uint8_t>(what.c_str());
      if (b > 1) c.fail(what + " is a bool of value " + std::to_string(b) + " (must be 0 or 1)");
      v.data = b == 1;
      break;
    }
    case ValueType::String: v.data = c.read_string(what); break;
    case ValueType::Array: {
      if (depth >= kMaxNesting) c.fail(what + " nests arrays deeper than " + std::to_string(kMaxNesting) + " levels");
      const uint32_t et = c.read<uint32_t>("an array element type");
      if (!known_value_type(et)) c.fail(what + " is an array of unknown value type " + std::to_string(et));
      v.elem_type = static_cast<ValueType>(et);
      const uint64_t n = c.read<uint64_t>("an array length");
      if (n > c.left() / min_value_bytes(v.elem_type))
        c.fail("truncated file: " + what + " claims " + std::to_string(n) + " elements, more than the " +
               std::to_string(c.left()) + " bytes left can hold");
      std::vector<Value> items;
      items.reserve(static_cast<size_t>(n));
      for (uint64_t i = 0; i < n; ++i) items.push_back(read_value(c, v.elem_type, what, depth + 1));
      v.data = std::move(items);
      break;
    }
  }
  return v;
}

// a * b, or nullopt past int64.
std::optional<int64_t> checked_mul(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

}  // namespace

// ---- types --------------------------------------------------------------------------------------

std::string_view value_type_name(ValueType t) {
  switch (t) {
    case ValueType::U8: return "uint8";
    case ValueType::I8: return "int8";
    case ValueType::U16: return "uint16";
    case ValueType::I16: return "int16";
    case ValueType::U32: return "uint32";
    case ValueType::I32: return "int32";
    case ValueType::F32: return "float32";
    case ValueType::Bool: return "bool";
    case ValueType::String: return "string";
    case ValueType::Array: return "array";
    case ValueType::U64: return "uint64";
    case ValueType::I64: return "int64";
    case ValueType::F64: return "float64";
  }
  return "?";
}

std::optional<BlockLayout> block_layout(uint32_t type) {
  // ggml's type_traits (block sizes in elements, block sizes in bytes). Q8_1 and Q8_K are
  // intermediate types of ggml's dot products, never stored in files.
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::F32: return BlockLayout{"F32", 1, 4};
    case GgmlType::F16: return BlockLayout{"F16", 1, 2};
    case GgmlType::Q4_0: return BlockLayout{"Q4_0", 32, 18};
    case GgmlType::Q4_1: return BlockLayout{"Q4_1", 32, 20};
    case GgmlType::Q5_0: return BlockLayout{"Q5_0", 32, 22};
    case GgmlType::Q5_1: return BlockLayout{"Q5_1", 32, 24};
    case GgmlType::Q8_0: return BlockLayout{"Q8_0", 32, 34};
    case GgmlType::Q2_K: return BlockLayout{"Q2_K", 256, 84};
    case GgmlType::Q3_K: return BlockLayout{"Q3_K", 256, 110};
    case GgmlType::Q4_K: return BlockLayout{"Q4_K", 256, 144};
    case GgmlType::Q5_K: return BlockLayout{"Q5_K", 256, 176};
    case GgmlType::Q6_K: return BlockLayout{"Q6_K", 256, 210};
    case GgmlType::IQ2_XXS: return BlockLayout{"IQ2_XXS", 256, 66};
    case GgmlType::IQ2_XS: return BlockLayout{"IQ2_XS", 256, 74};
    case GgmlType::IQ3_XXS: return BlockLayout{"IQ3_XXS", 256, 98};
    case GgmlType::IQ1_S: return BlockLayout{"IQ1_S", 256, 50};
    case GgmlType::IQ4_NL: return BlockLayout{"IQ4_NL", 32, 18};
    case GgmlType::IQ3_S: return BlockLayout{"IQ3_S", 256, 110};
    case GgmlType::IQ2_S: return BlockLayout{"IQ2_S", 256, 82};
    case GgmlType::IQ4_XS: return BlockLayout{"IQ4_XS", 256, 136};
    case GgmlType::I8: return BlockLayout{"I8", 1, 1};
    case GgmlType::I16: return BlockLayout{"I16", 1, 2};
    case GgmlType::I32: return BlockLayout{"I32", 1, 4};
    case GgmlType::I64: return BlockLayout{"I64", 1, 8};
    case GgmlType::F64: return BlockLayout{"F64", 1, 8};
    case GgmlType::IQ1_M: return BlockLayout{"IQ1_M", 256, 56};
    case GgmlType::BF16: return BlockLayout{"BF16", 1, 2};
    case GgmlType::TQ1_0: return BlockLayout{"TQ1_0", 256, 54};
    case GgmlType::TQ2_0: return BlockLayout{"TQ2_0", 256, 66};
    default: break;
  }
  if (type == 39) return BlockLayout{"MXFP4", 32, 17};
  return std::nullopt;
}

std::string ggml_type_name(uint32_t type) {
  if (const auto b = block_layout(type)) return std::string(b->name);
  return "type " + std::to_string(type);
}

// ---- values -------------------------------------------------------------------------------------

bool Value::is_integer() const {
  switch (type) {
    case ValueType::U8:
    case ValueType::I8:
    case ValueType::U16:
    case ValueType::I16:
    case ValueType::U32:
    case ValueType::I32:
    case ValueType::U64:
    case ValueType::I64: return true;
    default: return false;
  }
}

int64_t Value::as_int(const std::string& what) const {
  if (!is_integer()) throw Error(what + " must be an integer, got " + std::string(value_type_name(type)));
  if (const auto* u = std::get_if<uint64_t>(&data)) throw Error(what + " is too large: " + std::to_string(*u));
  return std::get<int64_t>(data);
}

double Value::as_double(const std::string& what) const {
  if (type == ValueType::F32 || type == ValueType::F64) return std::get<double>(data);
  if (is_integer()) {
    if (const auto* u = std::get_if<uint64_t>(&data)) return static_cast<double>(*u);
    return static_cast<double>(std::get<int64_t>(data));
  }
  throw Error(what + " must be a number, got " + std::string(value_type_name(type)));
}

bool Value::as_bool(const std::string& what) const {
  if (type != ValueType::Bool) throw Error(what + " must be a bool, got " + std::string(value_type_name(type)));
  return std::get<bool>(data);
}

const std::string& Value::as_string(const std::string& what) const {
  if (type != ValueType::String) throw Error(what + " must be a string, got " + std::string(value_type_name(type)));
  return std::get<std::string>(data);
}

const std::vector<Value>& Value::as_array(const std::string& what) const {
  if (type != ValueType::Array) throw Error(what + " must be an array, got " + std::string(value_type_name(type)));
  return std::get<std::vector<Value>>(data);
}

std::string Value::to_string() const {
  switch (type) {
    case ValueType::String: return printable(std::get<std::string>(data));
    case ValueType::Bool: return std::get<bool>(data) ? "true" : "false";
    case ValueType::F32:
    case ValueType::F64: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.9g", std::get<double>(data));
      return buf;
    }
    case ValueType::Array: {
      const auto& items = std::get<std::vector<Value>>(data);
      std::string out = "[" + std::string(value_type_name(elem_type)) + " x " + std::to_string(items.size());
      if (items.size() <= 8) {
        out += ":";
        for (const Value& v : items) out += " " + v.to_string();
      }
      return out + "]";
    }
    default:
      if (const auto* u = std::get_if<uint64_t>(&data)) return std::to_string(*u);
      return std::to_string(std::get<int64_t>(data));
  }
}

const Value* Header::find(std::string_view key) const {
  for (const auto& [k, v] : metadata)
    if (k == key) return &v;
  return nullptr;
}

const TensorInfo* Header::find_tensor(std::string_view name) const {
  for (const TensorInfo& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

// ---- parsing ------------------------------------------------------------------------------------

Header parse(std::span<const std::byte> file, const std::string& label) {
  Cursor c(file, label);
  Header h;
  if (file.size() < 4) c.fail("not a GGUF file: " + std::to_string(file.size()) + " bytes");
  const uint32_t magic = c.read<uint32_t>("the magic");
  if (magic != kMagic) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", magic);
    throw Error(label + ": not a GGUF file (magic " + buf + ", expected \"GGUF\")");
  }
  h.version = c.read<uint32_t>("the version");
  if (h.version == 1) throw Error(label + ": GGUF version 1 is not supported (only versions 2 and 3)");
  if (h.version != 2 && h.version != 3) {
    const bool swapped = __builtin_bswap32(h.version) == 2 || __builtin_bswap32(h.version) == 3;
    throw Error(label + ": unsupported GGUF version " + std::to_string(h.version) +
                (swapped ? " (a big-endian file; only little-endian GGUF is supported)" : " (only versions 2 and 3)"));
  }
  const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
  const uint64_t n_kv = c.read<uint64_t>("the metadata count");
  // Each key/value takes at least 13 bytes and each tensor info at least 24: bound the counts
  // before reserving anything.
  if (n_kv > c.left() / 13)
    c.fail("truncated file: " + std::to_string(n_kv) + " metadata entries cannot fit in the " +
           std::to_string(c.left()) + " bytes left");
  if (n_tensors > c.left() / 24)
    c.fail("truncated file: " + std::to_string(n_tensors) + " tensors cannot fit in the " +
           std::to_string(c.left()) + " bytes left");

  std::set<std::string, std::less<>> keys;
  h.metadata.reserve(static_cast<size_t>(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.read_string("metadata key " + std::to_string(i));
    if (key.empty()) c.fail("metadata key " + std::to_string(i) + " is empty");
    const std::string what = "metadata key " + printable(key);
    if (!keys.insert(key).second) c.fail("duplicate " + what);
    const uint32_t type = c.read<uint32_t>("a value type");
    if (!known_value_type(type)) c.fail(what + " has unknown value type " + std::to_string(type));
    Value v = read_value(c, static_cast<ValueType>(type), what, 0);
    h.metadata.emplace_back(std::move(key), std::move(v));
  }
  if (const Value* a = h.find("general.alignment")) {
    if (!a->is_integer()) throw Error(label + ": general.alignment must be an integer, got " + std::string(value_type_name(a->type)));
    const int64_t al = a->as_int(label + ": general.alignment");
    if (al <= 0 || al > (1 << 30) || !std::has_single_bit(static_cast<uint64_t>(al)))
      throw Error(label + ": general.alignment " + std::to_string(al) + " is not a power of two (up to 2^30)");
    h.alignment = static_cast<uint64_t>(al);
  }

  std::set<std::string, std::less<>> names;
  h.tensors.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    t.name = c.read_string("tensor " + std::to_string(i) + "'s name");
    const std::string what = "tensor " + printable(t.name);
    if (t.name.empty()) c.fail("tensor " + std::to_string(i) + " has an empty name");
    if (!names.insert(t.name).second) c.fail("duplicate " + what);
    const uint32_t n_dims = c.read<uint32_t>("a dimension count");
    if (n_dims > kMaxDims) c.fail(what + " has " + std::to_string(n_dims) + " dimensions (at most 4)");
    t.numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim = c.read<uint64_t>("a dimension");
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        c.fail(what + " has dimension " + std::to_string(dim) + ", too large");
      t.dims.push_back(static_cast<int64_t>(dim));
      const auto n = checked_mul(t.numel, static_cast<int64_t>(dim));
      if (!n) c.fail(what + " has more elements than fit in 64 bits");
      t.numel = *n;
    }
    t.type = c.read<uint32_t>("a tensor type");
    const auto layout = block_layout(t.type);
    if (!layout) c.fail(what + " has unknown ggml type " + std::to_string(t.type));
    const int64_t row = t.dims.empty() ? 1 : t.dims[0];
    if (row % layout->block_elems != 0)
      c.fail(what + " of type " + std::string(layout->name) + " has rows of " + std::to_string(row) +
             " elements, not a multiple of its block of " + std::to_string(layout->block_elems));
    const auto bytes = checked_mul(t.numel / layout->block_elems, layout->block_bytes);
    if (!bytes) c.fail(what + " is larger than 2^63 bytes");
    t.nbytes = static_cast<uint64_t>(*bytes);
    t.offset = c.read<uint64_t>("a tensor offset");
    if (t.offset % h.alignment != 0)
      c.fail(what + " has offset " + std::to_string(t.offset) + ", not a multiple of the alignment " +
             std::to_string(h.alignment));
    h.tensors.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment.
  const uint64_t end = c.pos();
  h.data_start = end + (h.alignment - end % h.alignment) % h.alignment;
  const uint64_t size = file.size();
  const uint64_t data_size = h.data_start <= size ? size - h.data_start : 0;
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : h.tensors) {
    if (t.nbytes == 0) continue;
    if (h.data_start > size || t.offset > data_size || t.nbytes > data_size - t.offset)
      throw Error(label + ": truncated file: tensor " + printable(t.name) + " (" + ggml_type_name(t.type) +
                  ", " + std::to_string(t.nbytes) + " bytes at data offset " + std::to_string(t.offset) +
                  ") extends past the end of the file (" + std::to_string(data_size) + " data bytes)");
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& prev = *by_offset[i - 1];
    if (prev.offset + prev.nbytes > by_offset[i]->offset)
      throw Error(label + ": tensors " + printable(prev.name) + " and " + printable(by_offset[i]->name) +
                  " overlap in the data section");
  }
  return h;
}

// ---- the mapped file ----------------------------------------------------------------------------

std::unique_ptr<File> File::open(const std::filesystem::path& path) {
  std::unique_ptr<File> file(new File());
  file->path_ = path;
  const std::span<const std::byte> mapping = map_file(path);
  file->base_ = mapping.data();
  file->size_ = mapping.size();
  file->header_ = parse({file->base_, file->size_}, path.string());
  return file;
}

File::~File() { unmap_file({base_, size_}); }

std::span<const std::byte> File::data(const TensorInfo& t) const {
  FS_ASSERT(header_.data_start + t.offset + t.nbytes <= size_ || t.nbytes == 0, "a validated tensor leaves the file");
  if (t.nbytes == 0) return {};
  return {base_ + header_.data_start + t.offset, t.nbytes};
}

void File::release(const TensorInfo& t) const {
  if (t.nbytes == 0) return;
  const auto* begin = base_ + header_.data_start + t.offset;
  release_pages(begin, begin + t.nbytes);
}

// ---- dequantization -----------------------------------------------------------------------------

namespace {

uint16_t load_u16(const std::byte* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// The block formats of ggml-common.h. Every block starts with its fp16 scale d.
void dequantize_q8_0(const std::byte* b, float* y) {  // d, int8 qs[32]: x = q * d
  const float d = half_to_float(load_u16(b));
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

void dequantize_q4_0(const std::byte* b, float* y) {  // d, qs[16]: low nibbles are 0..15, high 16..31
  const float d = half_to_float(load_u16(b));
  for (int j = 0; j < 16; ++j) {
    const auto q = static_cast<uint8_t>(b[2 + j]);
    y[j] = static_cast<float>((q & 0x0f) - 8) * d;
    y[j + 16] = static_cast<float>((q >> 4) - 8) * d;
  }
}

void dequantize_q4_1(const std::byte* b, float* y) {  // d, m, qs[16]: x = q * d + m
  const float d = half_to_float(load_u16(b)), m = half_to_float(load_u16(b + 2));
  for (int j = 0; j < 16; ++j) {
    const auto q = static_cast<uint8_t>(b[4 + j]);
    y[j] = static_cast<float>(q & 0x0f) * d + m;
    y[j + 16] = static_cast<float>(q >> 4) * d + m;
  }
}

void dequantize_q5_0(const std::byte* b, float* y) {  // d, qh[4], qs[16]: 5th bits in qh, x = (q-16) * d
  const float d = half_to_float(load_u16(b));
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  for (int j = 0; j < 16; ++j) {
    const auto q = static_cast<uint8_t>(b[6 + j]);
    const int x0 = ((q & 0x0f) | (((qh >> j) << 4) & 0x10)) - 16;
    const int x1 = ((q >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
    y[j] = static_cast<float>(x0) * d;
    y[j + 16] = static_cast<float>(x1) * d;
  }
}

void dequantize_q5_1(const std::byte* b, float* y) {  // d, m, qh[4], qs[16]: x = q * d + m
  const float d = half_to_float(load_u16(b)), m = half_to_float(load_u16(b + 2));
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  for (int j = 0; j < 16; ++j) {
    const auto q = static_cast<uint8_t>(b[8 + j]);
    const int x0 = (q & 0x0f) | (((qh >> j) << 4) & 0x10);
    const int x1 = (q >> 4) | ((qh >> (j + 12)) & 0x10);
    y[j] = static_cast<float>(x0) * d + m;
    y[j + 16] = static_cast<float>(x1) * d + m;
  }
}

// K-quants: super-blocks of 256 in 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes.
void scale_min_k4(int j, const uint8_t* q, uint8_t& d, uint8_t& m) {
  if (j < 4) {
    d = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    d = static_cast<uint8_t>((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
    m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Q4_K: d, dmin, scales[12], qs[128]; Q5_K adds qh[32] (the 5th bits) before qs.
void dequantize_q45_k(const std::byte* b, float* y, bool five_bits) {
  const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
  const auto* scales = reinterpret_cast<const uint8_t*>(b + 4);
  const auto* qh = reinterpret_cast<const uint8_t*>(b + 16);
  const auto* q = reinterpret_cast<const uint8_t*>(b + (five_bits ? 48 : 16));
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    uint8_t sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) {
      const int hi1 = five_bits && (qh[l] & u1) ? 16 : 0, hi2 = five_bits && (qh[l] & u2) ? 16 : 0;
      y[j + l] = d1 * static_cast<float>((q[l] & 0x0f) + hi1) - m1;
      y[j + 32 + l] = d2 * static_cast<float>((q[l] >> 4) + hi2) - m2;
    }
    u1 = static_cast<uint8_t>(u1 << 2);
    u2 = static_cast<uint8_t>(u2 << 2);
  }
}

void dequantize_q6_k(const std::byte* b, float* y) {  // ql[128], qh[64], int8 scales[16], d
  const auto* ql = reinterpret_cast<const uint8_t*>(b);
  const auto* qh = reinterpret_cast<const uint8_t*>(b + 128);
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_to_float(load_u16(b + 208));
  for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

}  // namespace

bool can_dequantize(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
    case GgmlType::Q5_0:
    case GgmlType::Q5_1:
    case GgmlType::Q4_K:
    case GgmlType::Q5_K:
    case GgmlType::Q6_K: return true;
    default: return false;
  }
}

void dequantize(uint32_t type, std::span<const std::byte> src, int64_t n, float* dst, const std::string& what) {
  const auto layout = block_layout(type);
  if (!layout || !can_dequantize(type))
    throw Error(what + " has ggml type " + ggml_type_name(type) +
                ", which FineServe cannot dequantize (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
                "Q4_K, Q5_K, Q6_K)");
  FS_ASSERT(n >= 0 && n % layout->block_elems == 0 &&
                src.size() == static_cast<size_t>(n / layout->block_elems * layout->block_bytes),
            "dequantize: the byte span does not hold n elements");
  const std::byte* p = src.data();
  const int64_t blocks = n / layout->block_elems;
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::F32: std::memcpy(dst, p, static_cast<size_t>(n) * 4); break;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(load_u16(p + 2 * i));
      break;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(load_u16(p + 2 * i));
      break;
    case GgmlType::Q8_0:
      for (int64_t i = 0; i < blocks; ++i) dequantize_q8_0(p + i * 34, dst + i * 32);
      break;
    case GgmlType::Q4_0:
      for (int64_t i = 0; i < blocks; ++i) dequantize_q4_0(p + i * 18, dst + i * 32);
      break;
    case GgmlType::Q4_1:
      for (int64_t i = 0; i < blocks; ++i) dequantize_q4_1(p + i * 20, dst + i * 32);
      break;
    case GgmlType::Q5_0:
      for (int64_t i = 0; i < blocks; ++i) dequantize_q5_0(p + i * 22, dst + i * 32);
      break;
    case GgmlType::Q5_1:
      for (int64_t i = 0; i < blocks; ++i) dequantize_q5_1(p + i * 24, dst + i * 32);
      break;
    case GgmlType::Q4_K:
      for (int64_t i = 0; i < blocks; ++i) dequantize_q45_k(p + i * 144, dst + i * 256, false);
      break;
    case GgmlType::Q5_K:
      for (int64_t i = 0; i < blocks; ++i) dequantize_q45_k(p + i * 176, dst + i * 256, true);
      break;
    case GgmlType::Q6_K:
      for (int64_t i = 0; i < blocks; ++i) dequantize_q6_k(p + i * 210, dst + i * 256);
      break;
    default: FS_ASSERT(false, "can_dequantize and dequantize disagree");
  }
}

}  // namespace fineserve::ckpt::gguf
