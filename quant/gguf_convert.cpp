// GGUF -> FineQuant checkpoint (see gguf_convert.h).
#include "quant/gguf_convert.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "kernels/base.h"
#include "kernels/half.h"
#include "models/checkpoint/atomic_dir.h"
#include "models/checkpoint/safetensors.h"
#include "models/checkpoint/util.h"
#include "quant/format.h"

namespace fineserve::quant {
namespace {

namespace fs = std::filesystem;
using ckpt::gguf::GgmlType;
using nlohmann::json;

constexpr const char* kStampName = "gguf_source.json";

uint16_t load_u16(const std::byte* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// How one GGUF tensor lands in the checkpoint.
enum class Treatment { Exact, Requantize, Dense, DenseF32 };

Treatment treatment_of(const ckpt::GgufTensorPlan& t) {
  const auto type = static_cast<GgmlType>(t.src->type);
  const bool floating = type == GgmlType::F32 || type == GgmlType::F16 || type == GgmlType::BF16;
  if (t.shape.size() != 2) return floating ? Treatment::Dense : Treatment::DenseF32;
  if (type == GgmlType::Q4_0 || type == GgmlType::Q8_0 || type == GgmlType::Q4_1) return Treatment::Exact;
  return floating ? Treatment::Dense : Treatment::Requantize;
}

// "model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj".
std::string stem_of(const std::string& hf_name) { return hf_name.substr(0, hf_name.size() - std::string(".weight").size()); }

DType dense_dtype(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::F16: return DType::F16;
    case GgmlType::BF16: return DType::BF16;
    default: return DType::F32;
  }
}

// The group a re-quantized matrix gets: 32 where K allows it (every K-quant's K does), else K.
int64_t requant_group(int64_t cols) { return is_allowed_group(cols, 32) ? 32 : cols; }

// Rows of q (a FineQuant matrix in GGUF row order) put into HF order: row r goes to hf_row(r).
void permute_rows(QuantizedMatrix& q, const ckpt::GgufImportPlan& plan, const ckpt::GgufTensorPlan& t) {
  if (!t.rotary) return;
  const int64_t code_row = q.bits == 4 ? q.cols / 2 : q.cols, groups = q.cols / q.group;
  QuantizedMatrix p = q;
  for (int64_t r = 0; r < q.rows; ++r) {
    const int64_t to = plan.hf_row(t, r);
    std::memcpy(p.codes.data() + to * code_row, q.codes.data() + r * code_row, static_cast<size_t>(code_row));
    std::memcpy(p.scales.data() + to * groups, q.scales.data() + r * groups, static_cast<size_t>(groups) * 2);
    if (!q.offsets.empty())
      std::memcpy(p.offsets.data() + to * groups, q.offsets.data() + r * groups, static_cast<size_t>(groups) * 4);
  }
  q = std::move(p);
}

// The whole tensor as fp32 in HF layout (rotary rows / elements permuted back).
std::vector<float> dequantized(const ckpt::GgufImportPlan& plan, const ckpt::GgufTensorPlan& t, const std::string& what) {
  const ckpt::gguf::TensorInfo& info = *t.src;
  const int64_t cols = info.dims.empty() ? 1 : info.dims[0], rows = cols ? info.numel / cols : 0;
  const uint64_t row_bytes = rows ? info.nbytes / static_cast<uint64_t>(rows) : 0;
  const std::span<const std::byte> data = plan.file->data(info);
  std::vector<float> out(static_cast<size_t>(info.numel)), row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    ckpt::gguf::dequantize(info.type, data.subspan(static_cast<size_t>(r) * row_bytes, row_bytes), cols, row.data(), what);
    float* dst = out.data() + plan.hf_row(t, r) * cols;
    for (int64_t j = 0; j < cols; ++j) dst[plan.hf_element(t, j)] = row[static_cast<size_t>(j)];
  }
  return out;
}

// Dense bytes as stored (F32 / F16 / BF16), in HF layout.
std::vector<std::byte> dense_bytes(const ckpt::GgufImportPlan& plan, const ckpt::GgufTensorPlan& t) {
  const ckpt::gguf::TensorInfo& info = *t.src;
  const size_t es = dtype_size(dense_dtype(info.type));
  const int64_t cols = info.dims.empty() ? 1 : info.dims[0], rows = cols ? info.numel / cols : 0;
  const std::span<const std::byte> data = plan.file->data(info);
  std::vector<std::byte> out(data.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      std::memcpy(out.data() + static_cast<size_t>(plan.hf_row(t, r) * cols + plan.hf_element(t, j)) * es,
                  data.data() + static_cast<size_t>(r * cols + j) * es, es);
  return out;
}

template <typename T>
std::span<const std::byte> bytes_of(const std::vector<T>& v) {
  return std::as_bytes(std::span<const T>(v));
}

std::string fingerprint(const ckpt::gguf::File& file) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](const std::string& s) {
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  };
  std::error_code ec;
  mix(std::to_string(fs::file_size(file.path(), ec)));
  for (const auto& t : file.header().tensors) mix(t.name + ":" + std::to_string(t.type) + ":" + std::to_string(t.offset));
  char buf[32];
  std::snprintf(buf, sizeof buf, "fnv1a64:%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// What identifies a GGUF file for reuse of its conversion: size, modification time, format version.
json stamp_for(const fs::path& gguf) {
  struct stat st {};
  if (::stat(gguf.c_str(), &st) != 0) throw Error("cannot stat " + gguf.string());
  const int64_t mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return {{"gguf", gguf.filename().string()},
          {"size", static_cast<int64_t>(st.st_size)},
          {"mtime_ns", mtime_ns},
          {"format_version", kFormatVersion}};
}

}  // namespace

std::optional<QuantizedMatrix> relay_gguf_blocks(uint32_t type, std::span<const std::byte> data, int64_t rows,
                                                 int64_t cols) {
  const auto t = static_cast<GgmlType>(type);
  if (t != GgmlType::Q4_0 && t != GgmlType::Q8_0 && t != GgmlType::Q4_1) return std::nullopt;
  const int64_t block_bytes = ckpt::gguf::block_layout(type)->block_bytes, blocks = cols / 32;
  FS_ASSERT(cols > 0 && cols % 32 == 0 && rows >= 0 &&
                data.size() == static_cast<size_t>(rows * blocks * block_bytes),
            "relay_gguf_blocks: the bytes do not hold [rows, cols]");
  QuantizedMatrix q;
  q.rows = rows;
  q.cols = cols;
  q.bits = t == GgmlType::Q8_0 ? 8 : 4;
  q.group = 32;
  q.codes.assign(static_cast<size_t>(q.bits == 4 ? rows * cols / 2 : rows * cols), 0);
  q.scales.resize(static_cast<size_t>(rows * blocks));
  if (t == GgmlType::Q4_1) q.offsets.resize(q.scales.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const std::byte* blk = data.data() + (r * blocks + b) * block_bytes;
      const size_t g = static_cast<size_t>(r * blocks + b);
      const uint16_t d = load_u16(blk);
      q.scales[g] = d;
      if (t == GgmlType::Q8_0) {
        std::memcpy(q.codes.data() + r * cols + b * 32, blk + 2, 32);
        continue;
      }
      // ggml: element j in the low nibble of byte j, element j + 16 in its high nibble, each the
      // unsigned q. FineQuant: element 2i in the low nibble of byte i, 2i + 1 in the high one, each
      // code + 8 — and code = q − 8, so the nibble values carry over unchanged.
      const auto* qs = reinterpret_cast<const uint8_t*>(blk + (t == GgmlType::Q4_1 ? 4 : 2));
      uint8_t* row = q.codes.data() + r * cols / 2 + b * 16;
      for (int j = 0; j < 16; ++j) {
        const unsigned lo = qs[j] & 0xfu, hi = qs[j] >> 4;
        row[j / 2] = static_cast<uint8_t>(row[j / 2] | (j % 2 ? lo << 4 : lo));
        row[(j + 16) / 2] = static_cast<uint8_t>(row[(j + 16) / 2] | (j % 2 ? hi << 4 : hi));
      }
      // d · q + m = d · (q − 8) + (m + 8 d).
      if (t == GgmlType::Q4_1) q.offsets[g] = half_to_float(load_u16(blk + 2)) + 8.0f * half_to_float(d);
    }
  }
  return q;
}

GgufConvertReport convert_gguf(const GgufConvertOptions& o,
                               const std::function<void(size_t, size_t, const std::string&)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  const ckpt::GgufImportPlan plan = ckpt::plan_gguf_import(o.gguf);
  const std::string label = o.gguf.string();
  GgufConvertReport report;
  report.import.architecture = plan.architecture;
  report.import.model_name = plan.model_name;
  report.import.source_types = plan.source_types;

  // What each tensor becomes, decided up front: the writer declares every name and the metadata
  // (groups, bits, source formats) before the first byte.
  FormatMetadata format;
  format.group_mode = "gguf";
  format.source_fingerprint = fingerprint(*plan.file);
  std::map<int, size_t> bits_count;
  std::vector<std::string> names;
  for (const ckpt::GgufTensorPlan& t : plan.tensors) {
    const Treatment tr = treatment_of(t);
    const std::string type = ckpt::gguf::ggml_type_name(t.src->type);
    if (tr == Treatment::Exact || tr == Treatment::Requantize) {
      const std::string stem = stem_of(t.name);
      const int bits = tr == Treatment::Requantize || static_cast<GgmlType>(t.src->type) == GgmlType::Q8_0 ? 8 : 4;
      format.groups[stem] = tr == Treatment::Exact ? 32 : requant_group(t.shape[1]);
      format.matrix_bits[stem] = bits;
      format.source_formats[stem] = "gguf:" + type + (tr == Treatment::Requantize ? "/requantized" : "");
      ++bits_count[bits];
      names.push_back(codes_name(stem));
      names.push_back(scales_name(stem));
      if (static_cast<GgmlType>(t.src->type) == GgmlType::Q4_1) names.push_back(offsets_name(stem));
    } else {
      if (t.shape.size() == 2) format.source_formats[stem_of(t.name)] = "gguf:" + type;
      names.push_back(t.name);
    }
  }
  const bool quantized = !bits_count.empty();
  if (quantized) format.bits = bits_count[4] >= bits_count[8] ? 4 : 8;
  ckpt::Metadata header = quantized ? to_header_metadata(format) : ckpt::Metadata{{"format", "pt"}};

  ckpt::AtomicDirectory out(o.out, o.overwrite);
  ckpt::CheckpointWriter writer(out.path(), names, header, o.max_shard_bytes);
  for (size_t i = 0; i < plan.tensors.size(); ++i) {
    const ckpt::GgufTensorPlan& t = plan.tensors[i];
    const ckpt::gguf::TensorInfo& info = *t.src;
    const std::string what = label + ": tensor " + info.name;
    if (progress) progress(i, plan.tensors.size(), t.name);
    const Treatment tr = treatment_of(t);
    uint64_t written = 0;
    if (tr == Treatment::Exact || tr == Treatment::Requantize) {
      const int64_t rows = t.shape[0], cols = t.shape[1];
      QuantizedMatrix q;
      if (tr == Treatment::Exact) {
        q = *relay_gguf_blocks(info.type, plan.file->data(info), rows, cols);
        permute_rows(q, plan, t);
        ++report.exact;
      } else {
        spdlog::warn("{}: {} has no exact FineQuant layout; dequantized and re-quantized to int8 g{}", what,
                     ckpt::gguf::ggml_type_name(info.type), requant_group(cols));
        const std::vector<float> w = dequantized(plan, t, what);
        q = quantize({w.data(), DType::F32, rows, cols}, 8, requant_group(cols));
        ++report.requantized;
        report.requantized_tensors.push_back(info.name);
      }
      const std::string stem = stem_of(t.name);
      const MatrixFormat f{q.bits, q.group, !q.offsets.empty()};
      writer.add(codes_name(stem), f.code_dtype(), {rows, f.code_row_bytes(cols)}, bytes_of(q.codes));
      writer.add(scales_name(stem), DType::F16, {rows, f.groups_per_row(cols)}, bytes_of(q.scales));
      if (f.asymmetric) writer.add(offsets_name(stem), kOffsetDType, {rows, f.groups_per_row(cols)}, bytes_of(q.offsets));
      written = q.codes.size() + q.scales.size() * 2 + q.offsets.size() * 4;
    } else if (tr == Treatment::Dense) {
      const std::vector<std::byte> b = dense_bytes(plan, t);
      writer.add(t.name, dense_dtype(info.type), t.shape, b);
      written = b.size();
      ++report.dense;
    } else {  // a vector of a quantized type: fp32
      const std::vector<float> v = dequantized(plan, t, what);
      writer.add(t.name, DType::F32, t.shape, bytes_of(v));
      written = v.size() * 4;
      ++report.dense;
    }
    plan.file->release(info);
    report.import.bytes_in += info.nbytes;
    report.import.bytes_out += written;
  }
  writer.finish();
  report.import.tensors = plan.tensors.size();

  json config = plan.config;
  if (quantized) config["quantization_config"] = to_quantization_config(format);
  ckpt::write_gguf_side_files(plan, config, out.path());
  ckpt::write_file(out.path() / kStampName, stamp_for(o.gguf).dump(2) + "\n");
  out.commit();
  report.import.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (progress) progress(plan.tensors.size(), plan.tensors.size(), "");
  return report;
}

fs::path model_dir_for(const fs::path& model) {
  std::error_code ec;
  if (model.extension() != ".gguf" || !fs::is_regular_file(model, ec)) return model;
  const json want = stamp_for(model);
  auto reusable = [&want](const fs::path& dir) {
    std::error_code e;
    if (!fs::is_regular_file(dir / kStampName, e) || !fs::is_regular_file(dir / "config.json", e)) return false;
    const json have = json::parse(ckpt::read_file(dir / kStampName), nullptr, /*allow_exceptions=*/false);
    return !have.is_discarded() && have == want;
  };
  // Next to the file, where users of llama.cpp keep their models; else under the temp directory.
  fs::path dir = model;
  dir.replace_extension(".fineserve");
  const fs::path parent = fs::absolute(model, ec).parent_path();
  if (::access(parent.c_str(), W_OK) != 0) {
    const std::string key = fs::absolute(model, ec).string();
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : key) h = (h ^ c) * 1099511628211ull;
    char hex[20];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
    dir = fs::temp_directory_path() / "fineserve-gguf" / (model.stem().string() + "-" + hex);
    fs::create_directories(dir.parent_path(), ec);
  }
  if (reusable(dir)) {
    spdlog::info("{}: serving its conversion in {}", model.string(), dir.string());
    return dir;
  }
  spdlog::info("{}: converting to a FineQuant checkpoint in {} (GGUF blocks re-laid, not re-quantized)",
               model.string(), dir.string());
  GgufConvertOptions o;
  o.gguf = model;
  o.out = dir;
  o.overwrite = true;
  const GgufConvertReport r = convert_gguf(o);
  spdlog::info("{}: {} matrices exact, {} re-quantized, {} dense tensors in {:.1f} s", model.string(), r.exact,
               r.requantized, r.dense, r.import.seconds);
  return dir;
}

}  // namespace fineserve::quant
