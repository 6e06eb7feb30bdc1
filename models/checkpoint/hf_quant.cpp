#include "models/checkpoint/hf_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <numeric>

#include "kernels/base.h"
#include "kernels/half.h"
#include "models/checkpoint/config.h"

namespace fineserve::ckpt {

using nlohmann::json;

namespace {

// ---- quantization_config ----------------------------------------------------------------------

// Reads fields of one JSON object; messages name `where` ("config.json quantization_config").
struct Fields {
  const json& obj;
  std::string where;

  [[noreturn]] void fail(const std::string& field, const std::string& msg) const {
    throw Error(where + ": field \"" + field + "\" " + msg);
  }
  const json* find(const std::string& field) const {
    const auto it = obj.find(field);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  int64_t integer(const std::string& field, int64_t fallback) const {
    const json* v = find(field);
    if (!v) return fallback;
    if (!v->is_number_integer()) fail(field, "must be an integer, got " + v->dump());
    return v->get<int64_t>();
  }
  bool boolean(const std::string& field, bool fallback) const {
    const json* v = find(field);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(field, "must be true or false, got " + v->dump());
    return v->get<bool>();
  }
  std::string string(const std::string& field, const std::string& fallback) const {
    const json* v = find(field);
    if (!v) return fallback;
    if (!v->is_string()) fail(field, "must be a string, got " + v->dump());
    return v->get<std::string>();
  }
};

void check_bits_and_group(const Fields& f, const std::string& bits_field, const std::string& group_field,
                          HfQuantConfig& q) {
  if (q.bits != 4 && q.bits != 8) f.fail(bits_field, "is " + std::to_string(q.bits) + ": FineServe runs 4 or 8 bits");
  if (q.group_size == 0 || q.group_size < -1)
    f.fail(group_field, "is " + std::to_string(q.group_size) + ": expected a positive group size or -1 (one group per row)");
}

HfQuantConfig parse_gptq(const Fields& f) {
  HfQuantConfig q;
  q.method = HfQuantMethod::Gptq;
  q.bits = static_cast<int>(f.integer("bits", 4));
  q.group_size = f.integer("group_size", 128);
  check_bits_and_group(f, "bits", "group_size", q);
  q.symmetric = f.boolean("sym", true);
  q.desc_act = f.boolean("desc_act", false);
  // GPTQ's original ("v1") serialization stores each zero point minus one; gptqmodel's internal
  // "gptq_v2" stores it as is. Transformers and gptqmodel read "gptq" unless told otherwise.
  const std::string format = f.string("checkpoint_format", "gptq");
  if (format == "gptq") {
    q.zeros_minus_one = true;
  } else if (format != "gptq_v2") {
    f.fail("checkpoint_format", "is '" + format + "': supported are 'gptq' and 'gptq_v2' (not Marlin or BitBLAS "
                                                  "re-packings)");
  }
  return q;
}

HfQuantConfig parse_awq(const Fields& f) {
  HfQuantConfig q;
  q.method = HfQuantMethod::Awq;
  q.bits = static_cast<int>(f.integer("bits", f.integer("w_bit", 4)));
  q.group_size = f.integer("group_size", f.integer("q_group_size", 128));
  if (q.bits != 4) f.fail("bits", "is " + std::to_string(q.bits) + ": AWQ's GEMM packing is 4-bit");
  check_bits_and_group(f, "bits", "group_size", q);
  q.symmetric = false;
  if (!f.boolean("zero_point", true)) f.fail("zero_point", "is false: only AWQ with zero points is supported");
  std::string version = f.string("version", "gemm");
  std::transform(version.begin(), version.end(), version.begin(), [](unsigned char c) { return std::tolower(c); });
  if (version != "gemm")
    f.fail("version", "is '" + f.string("version", "") + "': only AWQ's GEMM packing is supported (not GEMV, "
                                                         "Marlin, exllama or IPEX layouts)");
  return q;
}

HfQuantConfig parse_compressed_tensors(const Fields& f) {
  HfQuantConfig q;
  q.method = HfQuantMethod::CompressedTensors;
  const std::string format = f.string("format", "");
  if (format != "pack-quantized")
    f.fail("format", "is '" + format + "': of compressed-tensors only 'pack-quantized' (W4A16 / W8A16) is supported");
  const json* groups = f.find("config_groups");
  if (!groups || !groups->is_object() || groups->empty())
    f.fail("config_groups", "must be a non-empty object of quantization schemes");
  bool first = true;
  for (const auto& [name, scheme] : groups->items()) {
    const Fields g{scheme, f.where + " config_groups." + name};
    if (!scheme.is_object()) f.fail("config_groups." + name, "must be an object");
    for (const char* act : {"input_activations", "output_activations"})
      if (g.find(act))
        g.fail(act, "is set: only weight-only schemes (W4A16, W8A16) are supported, got " + g.find(act)->dump());
    if (const json* fmt = g.find("format"); fmt && *fmt != "pack-quantized")
      g.fail("format", "is " + fmt->dump() + ": only 'pack-quantized' is supported");
    const json* weights = g.find("weights");
    if (!weights || !weights->is_object()) g.fail("weights", "must be an object");
    const Fields w{*weights, g.where + ".weights"};
    if (w.string("type", "int") != "int") w.fail("type", "is '" + w.string("type", "") + "': only integer weights");
    if (w.boolean("dynamic", false)) w.fail("dynamic", "is true: only static weight scales");
    HfQuantConfig s = q;
    s.bits = static_cast<int>(w.integer("num_bits", 8));
    s.symmetric = w.boolean("symmetric", true);
    const std::string strategy = w.string("strategy", "tensor");
    if (strategy == "group") {
      s.group_size = w.integer("group_size", 0);
      if (s.group_size <= 0) w.fail("group_size", "must be positive for strategy 'group'");
    } else if (strategy == "channel") {
      s.group_size = -1;
    } else {
      w.fail("strategy", "is '" + strategy + "': supported are 'group' and 'channel'");
    }
    check_bits_and_group(w, "num_bits", "group_size", s);
    const std::string actorder = w.find("actorder") && w.find("actorder")->is_string() ? w.string("actorder", "") : "";
    s.desc_act = actorder == "group" || actorder == "weight";
    if (!first && (s.bits != q.bits || s.group_size != q.group_size || s.symmetric != q.symmetric))
      g.fail("weights", "differ from another config group's: one scheme for all quantized layers is supported");
    q = s;
    first = false;
  }
  return q;
}

// ---- tensors ----------------------------------------------------------------------------------

struct Source {
  const Checkpoint& ckpt;
  const HfQuantConfig& q;
  const std::string& stem;

  std::string where() const { return "checkpoint " + ckpt.dir().string() + " (" + q.method_name() + ")"; }

  // The tensor `stem`.`suffix`, checked to have `shape` and one of `dtypes`.
  TensorView get(const std::string& suffix, const std::vector<int64_t>& shape, std::initializer_list<DType> dtypes,
                 const std::string& why) const {
    const std::string name = stem + "." + suffix;
    if (!ckpt.has(name)) throw Error(where() + ": missing tensor " + name);
    const TensorView t = ckpt.get(name);
    if (t.shape() != shape)
      throw Error(where() + ": tensor " + name + " has shape " + format_shape(t.shape()) + " but " + why +
                  " implies " + format_shape(shape));
    if (std::find(dtypes.begin(), dtypes.end(), t.dtype()) == dtypes.end())
      throw Error(where() + ": tensor " + name + " has dtype " + std::string(dtype_name(t.dtype())) +
                  ", not what " + q.method_name() + " stores there");
    return t;
  }
};

// Element i of a little-endian int32 tensor in (possibly unaligned) checkpoint memory.
uint32_t word(const TensorView& t, int64_t i) {
  uint32_t w;
  std::memcpy(&w, t.data + 4 * i, 4);
  return w;
}

float float_at(const TensorView& t, int64_t i) {
  if (t.dtype() == DType::F32) {
    float v;
    std::memcpy(&v, t.data + 4 * i, 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, t.data + 2 * i, 2);
  return t.dtype() == DType::BF16 ? bf16_to_float(h) : half_to_float(h);
}

// The unsigned field `index` of `bits` bits, fields packed low bits first into consecutive words.
uint32_t unpack(uint32_t w, int bits, int64_t index) {
  const int per_word = 32 / bits;
  return (w >> (bits * static_cast<int>(index % per_word))) & ((1u << bits) - 1u);
}

// Fills the re-laid matrix from accessors of the source, in the re-laid column order `k_order`
// (identity when empty): q(n, k) the unsigned code (signed codes biased by 2^(bits-1)),
// scale(n, g) and zero(n, g) (in the same biased scale as q) for the source group g of channel k.
template <class Q, class Scale, class Zero>
void fill(RelaidMatrix& m, int64_t rows, int64_t cols, const std::vector<int32_t>& group_of, Q q, Scale scale, Zero zero,
          const std::string& where) {
  const int64_t groups = cols / m.group;
  const int32_t bias = 1 << (m.bits - 1);
  m.codes.assign(static_cast<size_t>(m.bits == 4 ? rows * cols / 2 : rows * cols), 0);
  m.scales.resize(static_cast<size_t>(rows * groups));
  m.offsets.resize(static_cast<size_t>(rows * groups));
  bool any_offset = false;
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t k = m.k_order.empty() ? j : m.k_order[static_cast<size_t>(j)];
      const uint32_t code = q(n, k);  // 0 .. 2^bits - 1: FineQuant's code + 2^(bits-1)
      if (m.bits == 4)
        m.codes[static_cast<size_t>(n * cols / 2 + j / 2)] |= static_cast<uint8_t>(code << (4 * (j % 2)));
      else
        m.codes[static_cast<size_t>(n * cols + j)] = static_cast<uint8_t>(code ^ 0x80u);  // two's complement of code - 128
    }
    for (int64_t g = 0; g < groups; ++g) {
      // The source group of the re-laid group g: that of its first channel (fill's caller checked
      // that every channel of the run shares it).
      const int64_t first = g * m.group;
      const int64_t k = m.k_order.empty() ? first : m.k_order[static_cast<size_t>(first)];
      const int64_t src_group = group_of[static_cast<size_t>(k)];
      const float s = scale(n, src_group);
      if (!std::isfinite(s) || std::fabs(s) > 65504.0f)
        throw Error(where + ": scale " + std::to_string(s) + " of row " + std::to_string(n) + ", group " +
                    std::to_string(src_group) + " does not fit fp16");
      // w = s · (q − z) = s · (q − 2^(bits−1)) + s · (2^(bits−1) − z): exact in fp32 (an 8-bit
      // integer times a 16-bit float).
      const float offset = s * static_cast<float>(bias - zero(n, src_group));
      m.scales[static_cast<size_t>(n * groups + g)] = float_to_half(s);
      m.offsets[static_cast<size_t>(n * groups + g)] = offset;
      any_offset |= offset != 0.0f;
    }
  }
  if (!any_offset) m.offsets.clear();  // symmetric: every zero point sits at the code range's middle
}

// The source group of every input channel and, under activation order, the permutation of K that
// makes groups contiguous: channels sorted by group (stably), checked to give `group` channels to
// each group in turn.
std::vector<int32_t> groups_of_channels(const Source& src, const std::string& g_idx_name, int64_t cols,
                                        int64_t group, int64_t n_groups, std::vector<int32_t>& k_order) {
  std::vector<int32_t> group_of(static_cast<size_t>(cols));
  const std::string name = src.stem + "." + g_idx_name;
  if (!src.ckpt.has(name)) {
    for (int64_t k = 0; k < cols; ++k) group_of[static_cast<size_t>(k)] = static_cast<int32_t>(k / group);
    return group_of;
  }
  const TensorView g_idx = src.get(g_idx_name, {cols}, {DType::I32}, "the input dimension");
  for (int64_t k = 0; k < cols; ++k) {
    const auto g = static_cast<int32_t>(word(g_idx, k));
    if (g < 0 || g >= n_groups)
      throw Error(src.where() + ": " + name + "[" + std::to_string(k) + "] = " + std::to_string(g) +
                  " is not a group index below " + std::to_string(n_groups));
    group_of[static_cast<size_t>(k)] = g;
  }
  k_order.resize(static_cast<size_t>(cols));
  std::iota(k_order.begin(), k_order.end(), 0);
  std::stable_sort(k_order.begin(), k_order.end(),
                   [&](int32_t a, int32_t b) { return group_of[static_cast<size_t>(a)] < group_of[static_cast<size_t>(b)]; });
  bool identity = true;
  for (int64_t j = 0; j < cols; ++j) {
    const int32_t k = k_order[static_cast<size_t>(j)];
    if (group_of[static_cast<size_t>(k)] != j / group)
      throw Error(src.where() + ": " + name + " does not give each of the " + std::to_string(n_groups) +
                  " groups exactly " + std::to_string(group) + " input channels");
    identity &= k == j;
  }
  if (identity) k_order.clear();  // g_idx in plain order (desc_act false): nothing to permute
  return group_of;
}

RelaidMatrix relay_gptq(const Source& src, int64_t rows, int64_t cols, int64_t group) {
  const HfQuantConfig& q = src.q;
  const int per_word = 32 / q.bits;
  const int64_t n_groups = cols / group;
  RelaidMatrix m;
  m.bits = q.bits;
  m.group = group;
  const std::string why = "[out " + std::to_string(rows) + ", in " + std::to_string(cols) + "] at " +
                          std::to_string(q.bits) + " bits, group " + std::to_string(group);
  if (cols % per_word != 0 || rows % per_word != 0)
    throw Error(src.where() + ": " + src.stem + " is " + why + ": both dimensions must divide into " +
                std::to_string(per_word) + "-code words");
  const TensorView qweight = src.get("qweight", {cols / per_word, rows}, {DType::I32}, why);
  const TensorView qzeros = src.get("qzeros", {n_groups, rows / per_word}, {DType::I32}, why);
  const TensorView scales = src.get("scales", {n_groups, rows}, {DType::F16, DType::BF16, DType::F32}, why);
  const std::vector<int32_t> group_of = groups_of_channels(src, "g_idx", cols, group, n_groups, m.k_order);
  // v1 stores z − 1; transformers / gptqmodel turn it into z by adding 1 to every field of the
  // word at once (an int32 add whose carries they keep), which is what is mirrored here.
  const uint32_t plus_one = q.zeros_minus_one ? (q.bits == 4 ? 0x11111111u : 0x01010101u) : 0u;
  fill(
      m, rows, cols, group_of,
      [&](int64_t n, int64_t k) { return unpack(word(qweight, (k / per_word) * rows + n), q.bits, k); },
      [&](int64_t n, int64_t g) { return float_at(scales, g * rows + n); },
      [&](int64_t n, int64_t g) {
        return static_cast<int32_t>(unpack(word(qzeros, g * (rows / per_word) + n / per_word) + plus_one, q.bits, n));
      },
      src.where() + ": " + src.stem + ".scales");
  return m;
}

RelaidMatrix relay_awq(const Source& src, int64_t rows, int64_t cols, int64_t group) {
  // AutoAWQ's GEMM packing puts output column 8w + kOrder[i] in nibble i of word w; kField is its
  // inverse: the nibble holding column 8w + c.
  static constexpr int kField[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  const int64_t n_groups = cols / group;
  RelaidMatrix m;
  m.bits = 4;
  m.group = group;
  const std::string why = "[out " + std::to_string(rows) + ", in " + std::to_string(cols) + "] at group " +
                          std::to_string(group);
  if (rows % 8 != 0) throw Error(src.where() + ": " + src.stem + " is " + why + ": out must be a multiple of 8");
  const TensorView qweight = src.get("qweight", {cols, rows / 8}, {DType::I32}, why);
  const TensorView qzeros = src.get("qzeros", {n_groups, rows / 8}, {DType::I32}, why);
  const TensorView scales = src.get("scales", {n_groups, rows}, {DType::F16, DType::BF16, DType::F32}, why);
  std::vector<int32_t> group_of(static_cast<size_t>(cols));
  for (int64_t k = 0; k < cols; ++k) group_of[static_cast<size_t>(k)] = static_cast<int32_t>(k / group);
  auto nibble = [](uint32_t w, int64_t n) { return (w >> (4 * kField[n % 8])) & 0xFu; };
  fill(
      m, rows, cols, group_of, [&](int64_t n, int64_t k) { return nibble(word(qweight, k * (rows / 8) + n / 8), n); },
      [&](int64_t n, int64_t g) { return float_at(scales, g * rows + n); },
      [&](int64_t n, int64_t g) { return static_cast<int32_t>(nibble(word(qzeros, g * (rows / 8) + n / 8), n)); },
      src.where() + ": " + src.stem + ".scales");
  return m;
}

RelaidMatrix relay_compressed_tensors(const Source& src, int64_t rows, int64_t cols, int64_t group) {
  const HfQuantConfig& q = src.q;
  const int per_word = 32 / q.bits;
  const int64_t n_groups = cols / group;
  RelaidMatrix m;
  m.bits = q.bits;
  m.group = group;
  const std::string why = "[out " + std::to_string(rows) + ", in " + std::to_string(cols) + "] at " +
                          std::to_string(q.bits) + " bits, group " + std::to_string(group);
  const TensorView shape = src.get("weight_shape", {2}, {DType::I64, DType::I32}, "a 2-d weight");
  const int64_t es = static_cast<int64_t>(dtype_size(shape.dtype()));
  int64_t dims[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    if (es == 8) {
      std::memcpy(&dims[i], shape.data + 8 * i, 8);
    } else {
      int32_t d;
      std::memcpy(&d, shape.data + 4 * i, 4);
      dims[i] = d;
    }
  }
  if (dims[0] != rows || dims[1] != cols)
    throw Error(src.where() + ": " + src.stem + ".weight_shape is [" + std::to_string(dims[0]) + ", " +
                std::to_string(dims[1]) + "] but config.json implies [" + std::to_string(rows) + ", " +
                std::to_string(cols) + "]");
  const int64_t words_per_row = (cols + per_word - 1) / per_word;
  const TensorView packed = src.get("weight_packed", {rows, words_per_row}, {DType::I32}, why);
  const TensorView scales = src.get("weight_scale", {rows, n_groups}, {DType::F16, DType::BF16, DType::F32}, why);
  const std::vector<int32_t> group_of = groups_of_channels(src, "weight_g_idx", cols, group, n_groups, m.k_order);
  const int32_t bias = 1 << (q.bits - 1);
  // Zero points: absent (symmetric), or packed along the output dimension like the codes are
  // along K (signed values biased by 2^(bits−1)); older writers stored them unpacked as [N, G].
  std::function<int32_t(int64_t, int64_t)> zero = [&](int64_t, int64_t) { return bias; };
  const std::string zp_name = src.stem + ".weight_zero_point";
  TensorView zp;
  if (src.ckpt.has(zp_name)) {
    zp = src.ckpt.get(zp_name);
    const int64_t packed_rows = (rows + per_word - 1) / per_word;
    if (zp.dtype() == DType::I32 && zp.shape() == std::vector<int64_t>{packed_rows, n_groups}) {
      zero = [&](int64_t n, int64_t g) {
        return static_cast<int32_t>(unpack(word(zp, (n / per_word) * n_groups + g), q.bits, n));
      };
    } else if ((zp.dtype() == DType::I8 || zp.dtype() == DType::I32) &&
               zp.shape() == std::vector<int64_t>{rows, n_groups}) {
      zero = [&](int64_t n, int64_t g) {
        const int64_t i = n * n_groups + g;
        int32_t v;
        if (zp.dtype() == DType::I8) {
          v = static_cast<int8_t>(zp.data[i]);
        } else {
          std::memcpy(&v, zp.data + 4 * i, 4);
        }
        return v + bias;
      };
    } else {
      throw Error(src.where() + ": tensor " + zp_name + " is " + std::string(dtype_name(zp.dtype())) + " " +
                  format_shape(zp.shape()) + ", expected I32 " + format_shape({packed_rows, n_groups}) +
                  " (packed) or I8 " + format_shape({rows, n_groups}));
    }
  } else if (!q.symmetric) {
    throw Error(src.where() + ": missing tensor " + zp_name + " of an asymmetric scheme");
  }
  fill(
      m, rows, cols, group_of,
      [&](int64_t n, int64_t k) { return unpack(word(packed, n * words_per_row + k / per_word), q.bits, k); },
      [&](int64_t n, int64_t g) { return float_at(scales, n * n_groups + g); }, zero,
      src.where() + ": " + src.stem + ".weight_scale");
  return m;
}

}  // namespace

std::string HfQuantConfig::method_name() const {
  switch (method) {
    case HfQuantMethod::Gptq: return "gptq";
    case HfQuantMethod::Awq: return "awq";
    case HfQuantMethod::CompressedTensors: return "compressed-tensors";
  }
  return "?";
}

std::string HfQuantConfig::describe() const {
  return method_name() + " " + std::to_string(bits) + "-bit group_size " + std::to_string(group_size) +
         (symmetric ? " symmetric" : " asymmetric") + (desc_act ? " act-order" : "");
}

std::optional<HfQuantConfig> parse_hf_quant_config(const json& config, const std::string& source) {
  if (!config.is_object()) return std::nullopt;
  const auto it = config.find("quantization_config");
  if (it == config.end() || it->is_null()) return std::nullopt;
  const Fields f{*it, source + " quantization_config"};
  if (!it->is_object()) throw Error(source + ": field \"quantization_config\" must be an object, got " + it->dump());
  const std::string method = f.string("quant_method", "");
  if (method == "finequant") return std::nullopt;  // FineServe's own: its safetensors headers say the rest
  if (method == "gptq") return parse_gptq(f);
  if (method == "awq") return parse_awq(f);
  if (method == "compressed-tensors") return parse_compressed_tensors(f);
  f.fail("quant_method", "is '" + method + "': supported are gptq, awq, compressed-tensors (pack-quantized) and "
                                           "FineServe's own finequant");
}

std::optional<HfQuantConfig> read_hf_quant_config(const Checkpoint& checkpoint) {
  const std::filesystem::path path = checkpoint.dir() / "config.json";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return std::nullopt;
  return parse_hf_quant_config(read_json_file(path), path.string());
}

bool has_hf_quantized(const Checkpoint& checkpoint, const HfQuantConfig& q, const std::string& stem) {
  return checkpoint.has(stem + (q.method == HfQuantMethod::CompressedTensors ? ".weight_packed" : ".qweight"));
}

RelaidMatrix relay_hf_matrix(const Checkpoint& checkpoint, const HfQuantConfig& q, const std::string& stem,
                             int64_t rows, int64_t cols) {
  FS_ASSERT(rows > 0 && cols > 0);
  const Source src{checkpoint, q, stem};
  const int64_t group = q.group_size == -1 ? cols : q.group_size;
  if (cols % group != 0)
    throw Error(src.where() + ": quantization_config group_size " + std::to_string(q.group_size) +
                " does not divide the input dimension " + std::to_string(cols) + " of " + stem);
  switch (q.method) {
    case HfQuantMethod::Gptq: return relay_gptq(src, rows, cols, group);
    case HfQuantMethod::Awq: return relay_awq(src, rows, cols, group);
    case HfQuantMethod::CompressedTensors: return relay_compressed_tensors(src, rows, cols, group);
  }
  FS_ASSERT(false, "unknown HfQuantMethod");
  return {};
}

}  // namespace fineserve::ckpt
