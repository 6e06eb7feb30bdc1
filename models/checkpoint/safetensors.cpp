// safetensors reading: header validation and the memory-mapped file.
#include "models/checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/checkpoint/util.h"

namespace fineserve::ckpt {

using nlohmann::json;

std::optional<uint64_t> tensor_nbytes(DType dtype, const std::vector<int64_t>& shape) {
  bool has_zero = false;
  for (int64_t d : shape) {
    if (d < 0) return std::nullopt;
    has_zero |= d == 0;
  }
  if (has_zero) return 0;
  int64_t numel = 1;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(numel, d, &numel)) return std::nullopt;
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(numel), dtype_size(dtype), &nbytes)) return std::nullopt;
  return nbytes;
}

int64_t TensorInfo::numel() const {
  // Shapes were validated by parse_header or SafetensorsWriter::add, so this cannot overflow
  // (a zero dimension is checked first: [huge, huge, 0] is empty, not an overflow).
  if (std::find(shape.begin(), shape.end(), int64_t{0}) != shape.end()) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

constexpr std::string_view kMetadataKey = "__metadata__";

// A JSON value for an error message, cut short: a hostile header can hold megabytes in one value.
// Text for an error message, cut short (a hostile header can hold megabytes in one string) at a
// UTF-8 character boundary, so the message stays valid UTF-8 for a JSON error body.
std::string clip(std::string s) {
  if (s.size() <= 120) return s;
  size_t cut = 117;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xc0) == 0x80) --cut;  // continuation byte
  return s.substr(0, cut) + "...";
}
std::string brief(const json& v) { return clip(v.dump()); }

[[noreturn]] void fail(const std::string& label, const std::string& msg) { throw Error(label + ": " + msg); }

[[noreturn]] void fail_tensor(const std::string& label, const std::string& name, const std::string& msg) {
  throw Error(label + ": tensor '" + clip(name) + "': " + msg);
}

// nlohmann::json keeps the last of duplicate keys silently; a header naming a tensor twice is
// ambiguous, so the parse callback rejects duplicates at every level.
json parse_json_rejecting_duplicates(std::string_view text, const std::string& label) {
  // nlohmann::json stops at a NUL byte as if the input ended there, which would let bytes after it
  // through unchecked. Valid JSON never holds a raw NUL (strings must escape it).
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos)
    fail(label, "header is not valid JSON: NUL byte at offset " + std::to_string(nul));
  std::vector<std::set<std::string>> open_objects;
  const json::parser_callback_t on_event = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start: open_objects.emplace_back(); break;
      case json::parse_event_t::object_end: open_objects.pop_back(); break;
      case json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!open_objects.back().insert(key).second) fail(label, "header repeats the key '" + clip(key) + "'");
        break;
      }
      default: break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), on_event);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1e400
    fail(label, std::string("header is not valid JSON: ") + e.what());
  }
}

std::vector<int64_t> parse_shape(const json& v, const std::string& label, const std::string& name) {
  if (!v.is_array()) fail_tensor(label, name, "\"shape\" must be an array of non-negative integers, got " + brief(v));
  std::vector<int64_t> shape;
  shape.reserve(v.size());
  for (const json& d : v) {
    if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail_tensor(label, name, "\"shape\" must be an array of non-negative integers, got " + brief(v));
    shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
  }
  return shape;
}

std::pair<uint64_t, uint64_t> parse_offsets(const json& v, const std::string& label, const std::string& name) {
  if (!v.is_array() || v.size() != 2 || !v[0].is_number_unsigned() || !v[1].is_number_unsigned())
    fail_tensor(label, name, "\"data_offsets\" must be [begin, end] with non-negative integers, got " + brief(v));
  return {v[0].get<uint64_t>(), v[1].get<uint64_t>()};
}

TensorInfo parse_entry(const std::string& name, const json& entry, uint64_t data_size, const std::string& label) {
  if (!entry.is_object()) fail_tensor(label, name, std::string("entry must be an object, got ") + entry.type_name());
  TensorInfo t;
  t.name = name;
  bool has_dtype = false, has_shape = false, has_offsets = false;
  for (const auto& [key, value] : entry.items()) {
    if (key == "dtype") {
      if (!value.is_string()) fail_tensor(label, name, "\"dtype\" must be a string, got " + brief(value));
      const auto& s = value.get_ref<const std::string&>();
      const auto dtype = dtype_from_name(s);
      if (!dtype) fail_tensor(label, name, "unknown dtype '" + clip(s) + "'");
      t.dtype = *dtype;
      has_dtype = true;
    } else if (key == "shape") {
      t.shape = parse_shape(value, label, name);
      has_shape = true;
    } else if (key == "data_offsets") {
      std::tie(t.begin, t.end) = parse_offsets(value, label, name);
      has_offsets = true;
    } else {
      fail_tensor(label, name, "unknown key '" + clip(key) + "'");
    }
  }
  if (!has_dtype) fail_tensor(label, name, "missing \"dtype\"");
  if (!has_shape) fail_tensor(label, name, "missing \"shape\"");
  if (!has_offsets) fail_tensor(label, name, "missing \"data_offsets\"");

  const std::string offsets = "[" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "]";
  if (t.begin > t.end) fail_tensor(label, name, "data_offsets " + offsets + " begin after end");
  if (t.end > data_size)
    fail_tensor(label, name,
                "data_offsets " + offsets + " run past the end of the data (" + std::to_string(data_size) + " bytes)");
  const auto nbytes = tensor_nbytes(t.dtype, t.shape);
  if (!nbytes) fail_tensor(label, name, "shape " + format_shape(t.shape) + " is too large");
  if (*nbytes != t.nbytes())
    fail_tensor(label, name,
                "data_offsets " + offsets + " span " + std::to_string(t.nbytes()) + " bytes but shape " +
                    format_shape(t.shape) + " of " + std::string(dtype_name(t.dtype)) + " needs " +
                    std::to_string(*nbytes));
  return t;
}

Metadata parse_metadata(const json& v, const std::string& label) {
  if (!v.is_object()) fail(label, std::string("\"__metadata__\" must be an object, got ") + v.type_name());
  Metadata metadata;
  for (const auto& [key, value] : v.items()) {
    if (!value.is_string())
      fail(label, "\"__metadata__\" value of '" + clip(key) + "' must be a string, got " + brief(value));
    metadata.emplace(key, value.get<std::string>());
  }
  return metadata;
}

std::string describe(const TensorInfo& t) {
  return "'" + clip(t.name) + "' [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ")";
}

uint64_t read_u64_le(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<uint64_t>(p[i]);
  return v;
}

}  // namespace

Header parse_header(std::string_view json_text, uint64_t data_size, const std::string& label) {
  const json root = parse_json_rejecting_duplicates(json_text, label);
  if (!root.is_object()) fail(label, std::string("header must be a JSON object, got ") + root.type_name());

  Header header;
  header.tensors.reserve(root.size());
  for (const auto& [key, value] : root.items()) {
    if (key == kMetadataKey) {
      header.metadata = parse_metadata(value, label);
    } else {
      header.tensors.push_back(parse_entry(key, value, data_size, label));
    }
  }

  std::sort(header.tensors.begin(), header.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  // Sorted by begin, spans are disjoint when each starts at or after the furthest end so far.
  // An empty span holds no bytes, so it overlaps nothing (several may share one offset).
  const TensorInfo* furthest = nullptr;
  for (const TensorInfo& t : header.tensors) {
    if (t.nbytes() == 0) continue;
    if (furthest && t.begin < furthest->end) fail(label, "tensors " + describe(*furthest) + " and " + describe(t) + " overlap");
    if (!furthest || t.end > furthest->end) furthest = &t;
  }
  return header;
}

ParsedFile parse_file_bytes(std::span<const std::byte> file, const std::string& label) {
  const uint64_t size = file.size();
  if (size < 8) fail(label, "truncated: " + std::to_string(size) + " bytes, need at least 8");
  const uint64_t header_len = read_u64_le(file.data());
  if (header_len < 2 || header_len > kMaxHeaderBytes)
    fail(label, "header length " + std::to_string(header_len) + " is outside [2, " + std::to_string(kMaxHeaderBytes) +
                    "]");
  if (header_len > size - 8)
    fail(label, "header length " + std::to_string(header_len) + " runs past end of file (size " +
                    std::to_string(size) + ")");
  const std::string_view text(reinterpret_cast<const char*>(file.data() + 8), header_len);
  if (text.front() != '{') fail(label, "header does not start with '{'");
  return ParsedFile{8 + header_len, parse_header(text, size - 8 - header_len, label)};
}

// ---- SafetensorsFile --------------------------------------------------------------------------

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::filesystem::path& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const std::span<const std::byte> mapping = map_file(path);
  file->base_ = mapping.data();
  file->size_ = mapping.size();
  ParsedFile parsed = parse_file_bytes({file->base_, file->size_}, path.string());
  file->data_start_ = parsed.data_start;
  file->header_ = std::move(parsed.header);
  for (size_t i = 0; i < file->header_.tensors.size(); ++i) file->index_.emplace(file->header_.tensors[i].name, i);
  return file;
}

SafetensorsFile::~SafetensorsFile() { unmap_file({base_, size_}); }

std::string_view SafetensorsFile::header_json() const {
  return {reinterpret_cast<const char*>(base_ + 8), data_start_ - 8};
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

TensorView SafetensorsFile::view(const TensorInfo& t) const {
  FS_ASSERT(find(t.name) == &t, "the TensorInfo belongs to another file");
  return TensorView{&t, base_ + data_start_ + t.begin};
}

void SafetensorsFile::release(const TensorInfo& t) const {
  FS_ASSERT(find(t.name) == &t, "the TensorInfo belongs to another file");
  // MADV_DONTNEED on anonymous memory would replace the tensor with zeros.
  if (in_memory_) return;
  release_pages(base_ + data_start_ + t.begin, base_ + data_start_ + t.end);
}

// ---- files and checkpoints built in memory ------------------------------------------------------

std::unique_ptr<SafetensorsFile> SafetensorsFile::build_in_memory(
    const std::string& label, const std::vector<TensorDecl>& tensors, const Metadata& metadata,
    const std::function<void(const TensorInfo&, std::byte*)>& fill) {
  // The header, with the tensors back to back in the given order. nlohmann::json would keep only
  // the last of two equal keys, so duplicates are caught here.
  json header = json::object();
  std::set<std::string, std::less<>> names;
  uint64_t offset = 0;
  for (const TensorDecl& t : tensors) {
    if (t.name == kMetadataKey || !names.insert(t.name).second)
      fail_tensor(label, t.name, "declared twice (or named like the metadata)");
    const auto nbytes = tensor_nbytes(t.dtype, t.shape);
    uint64_t end = 0;
    if (!nbytes || __builtin_add_overflow(offset, *nbytes, &end))
      fail_tensor(label, t.name, "shape " + format_shape(t.shape) + " is too large");
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape}, {"data_offsets", {offset, end}}};
    offset = end;
  }
  if (!metadata.empty()) header[std::string(kMetadataKey)] = metadata;
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {  // a name or metadata value that is not valid UTF-8
    fail(label, std::string("cannot write the header: ") + e.what());
  }
  // Spaces after the JSON (allowed by the format) put the data on a 64-byte boundary, as the
  // writer does: aligned tensors for whoever reads them in place.
  text.resize((8 + text.size() + 63) / 64 * 64 - 8, ' ');
  const uint64_t data_bytes = offset;
  if (text.size() > kMaxHeaderBytes) fail(label, "header of " + std::to_string(text.size()) + " bytes is too large");
  if (data_bytes > std::numeric_limits<uint64_t>::max() - 8 - text.size()) fail(label, "tensors too large");
  const uint64_t size = 8 + text.size() + data_bytes;

  // Anonymous memory, not the heap: pages are committed only when the fill first touches them (so
  // a parallel fill places them near the threads that write them), and the destructor's munmap
  // frees them as it unmaps a file.
  void* mem = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED)
    fail(label, "cannot allocate " + std::to_string(size) + " bytes of memory: " + std::strerror(errno));
  // Huge pages where the kernel allows them: filling tens of GB in 4 KiB pages costs millions of
  // page faults. Advice only; a refusal leaves ordinary pages.
  (void)::madvise(mem, size, MADV_HUGEPAGE);
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = label;
  file->in_memory_ = true;
  file->base_ = static_cast<const std::byte*>(mem);
  file->size_ = size;
  auto* bytes = static_cast<std::byte*>(mem);
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<std::byte>((text.size() >> (8 * i)) & 0xff);
  std::memcpy(bytes + 8, text.data(), text.size());

  ParsedFile parsed = parse_file_bytes({file->base_, file->size_}, label);
  file->data_start_ = parsed.data_start;
  file->header_ = std::move(parsed.header);
  for (size_t i = 0; i < file->header_.tensors.size(); ++i) file->index_.emplace(file->header_.tensors[i].name, i);
  for (const TensorDecl& t : tensors) {
    const TensorInfo* info = file->find(t.name);
    FS_ASSERT(info && info->begin + file->data_start_ + info->nbytes() <= size);
    if (fill) fill(*info, bytes + file->data_start_ + info->begin);
  }
  return file;
}

// Defined here beside the in-memory file it serves (the other Checkpoint members: checkpoint.cpp).
Checkpoint Checkpoint::from_files(const std::filesystem::path& label, std::vector<std::unique_ptr<SafetensorsFile>> files) {
  Checkpoint c;
  c.source_ = label;
  c.dir_ = label;
  for (auto& f : files) {
    FS_ASSERT(f != nullptr);
    c.add_file(std::move(f));
  }
  return c;
}

}  // namespace fineserve::ckpt
