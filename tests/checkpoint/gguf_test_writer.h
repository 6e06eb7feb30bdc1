// A GGUF writer for tests: a file built from a header and each tensor's bytes, or read from a
// fixture, mutated and written back (to check the import's errors and variants).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "models/checkpoint/gguf.h"

namespace fineserve::ckpt::gguf_testing {

inline void write_file_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

template <class T>
inline void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}
inline void put_string(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

inline void put_value(std::string& out, const gguf::Value& v) {
  switch (v.type) {
    case gguf::ValueType::U8: put<uint8_t>(out, static_cast<uint8_t>(std::get<int64_t>(v.data))); break;
    case gguf::ValueType::I8: put<int8_t>(out, static_cast<int8_t>(std::get<int64_t>(v.data))); break;
    case gguf::ValueType::U16: put<uint16_t>(out, static_cast<uint16_t>(std::get<int64_t>(v.data))); break;
    case gguf::ValueType::I16: put<int16_t>(out, static_cast<int16_t>(std::get<int64_t>(v.data))); break;
    case gguf::ValueType::U32: put<uint32_t>(out, static_cast<uint32_t>(std::get<int64_t>(v.data))); break;
    case gguf::ValueType::I32: put<int32_t>(out, static_cast<int32_t>(std::get<int64_t>(v.data))); break;
    case gguf::ValueType::U64:
      if (const auto* u = std::get_if<uint64_t>(&v.data))
        put<uint64_t>(out, *u);
      else
        put<uint64_t>(out, static_cast<uint64_t>(std::get<int64_t>(v.data)));
      break;
    case gguf::ValueType::I64: put<int64_t>(out, std::get<int64_t>(v.data)); break;
    case gguf::ValueType::F32: put<float>(out, static_cast<float>(std::get<double>(v.data))); break;
    case gguf::ValueType::F64: put<double>(out, std::get<double>(v.data)); break;
    case gguf::ValueType::Bool: put<uint8_t>(out, std::get<bool>(v.data) ? 1 : 0); break;
    case gguf::ValueType::String: put_string(out, std::get<std::string>(v.data)); break;
    case gguf::ValueType::Array: {
      const auto& items = std::get<std::vector<gguf::Value>>(v.data);
      put<uint32_t>(out, static_cast<uint32_t>(v.elem_type));
      put<uint64_t>(out, items.size());
      for (const auto& item : items) put_value(out, item);
      break;
    }
  }
}

inline gguf::Value str_value(const std::string& s) {
  gguf::Value v;
  v.type = gguf::ValueType::String;
  v.data = s;
  return v;
}
inline gguf::Value int_value(gguf::ValueType t, int64_t x) {
  gguf::Value v;
  v.type = t;
  v.data = x;
  return v;
}

// A whole file from a header (offsets recomputed unless keep_offsets) and each tensor's bytes.
struct Model {
  std::vector<std::pair<std::string, gguf::Value>> metadata;
  std::vector<gguf::TensorInfo> tensors;
  std::vector<std::string> data;  // per tensor
  uint32_t version = 3;
  uint64_t alignment = 32;

  void add_tensor(const std::string& name, std::vector<int64_t> dims, gguf::GgmlType type, std::string bytes = "") {
    gguf::TensorInfo t;
    t.name = name;
    t.dims = std::move(dims);
    t.type = static_cast<uint32_t>(type);
    const auto layout = gguf::block_layout(t.type);
    int64_t n = 1;
    for (int64_t d : t.dims) n *= d;
    if (bytes.empty()) bytes.assign(static_cast<size_t>(n / layout->block_elems * layout->block_bytes), '\0');
    tensors.push_back(t);
    data.push_back(std::move(bytes));
  }

  std::string build(bool keep_offsets = false) {
    std::string out;
    put<uint32_t>(out, 0x46554747);
    put<uint32_t>(out, version);
    put<uint64_t>(out, tensors.size());
    put<uint64_t>(out, metadata.size());
    for (const auto& [k, v] : metadata) {
      put_string(out, k);
      put<uint32_t>(out, static_cast<uint32_t>(v.type));
      put_value(out, v);
    }
    uint64_t offset = 0;
    for (auto& t : tensors) {
      if (!keep_offsets) {
        t.offset = offset;
        offset += (data[&t - tensors.data()].size() + alignment - 1) / alignment * alignment;
      }
      put_string(out, t.name);
      put<uint32_t>(out, static_cast<uint32_t>(t.dims.size()));
      for (int64_t d : t.dims) put<uint64_t>(out, static_cast<uint64_t>(d));
      put<uint32_t>(out, t.type);
      put<uint64_t>(out, t.offset);
    }
    out.resize((out.size() + alignment - 1) / alignment * alignment, '\0');
    const size_t data_start = out.size();
    for (size_t i = 0; i < tensors.size(); ++i) {
      out.resize(std::max(out.size(), data_start + tensors[i].offset + data[i].size()), '\0');
      std::memcpy(out.data() + data_start + tensors[i].offset, data[i].data(), data[i].size());
    }
    return out;
  }

  gguf::Value* find(const std::string& key) {
    for (auto& [k, v] : metadata)
      if (k == key) return &v;
    return nullptr;
  }
  size_t tensor_index(const std::string& name) const {
    for (size_t i = 0; i < tensors.size(); ++i)
      if (tensors[i].name == name) return i;
    ADD_FAILURE() << "no tensor " << name;
    return 0;
  }
};

// A Model holding everything a parsed file holds (to mutate and write back).
inline Model model_of(const std::filesystem::path& path) {
  const auto f = gguf::File::open(path);
  Model m;
  m.version = f->header().version;
  m.alignment = f->header().alignment;
  m.metadata = f->header().metadata;
  for (const auto& t : f->header().tensors) {
    m.tensors.push_back(t);
    const auto d = f->data(t);
    m.data.emplace_back(reinterpret_cast<const char*>(d.data()), d.size());
  }
  return m;
}

}  // namespace fineserve::ckpt::gguf_testing
