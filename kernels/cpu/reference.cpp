#include "kernels/cpu/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kernels/base.h"
#include "kernels/cpu/validate.h"
#include "kernels/half.h"

namespace fineserve::cpu::ref {
namespace {

// Element i of a dense float tensor of dtype t (possibly unaligned).
float load_float(const void* p, DType t, int64_t i) {
  const char* b = static_cast<const char*>(p);
  switch (t) {
    case DType::F32: {
      float f;
      std::memcpy(&f, b + 4 * i, 4);
      return f;
    }
    case DType::F16:
    case DType::BF16: {
      uint16_t h;
      std::memcpy(&h, b + 2 * i, 2);
      return t == DType::F16 ? half_to_float(h) : bf16_to_float(h);
    }
    default:
      FS_ASSERT(false, "not a float dtype");
  }
  return 0;
}

double act(Activation kind, double x) {
  switch (kind) {
    case Activation::ReLU: return x > 0 ? x : 0.0;
    case Activation::GELU: return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::GELUTanh: {
      const double c = std::sqrt(2.0 / 3.14159265358979323846);
      return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
    }
    case Activation::SiLU: return x / (1.0 + std::exp(-x));
  }
  return x;
}

}  // namespace

float weight_at(const WeightMatrix& w, int64_t r, int64_t c) {
  if (!w.quantized()) return load_float(w.data, w.dtype, r * w.cols + c);
  int code;
  if (w.bits == 8) {
    code = static_cast<const int8_t*>(w.data)[r * w.cols + c];
  } else {
    const uint8_t byte = static_cast<const uint8_t*>(w.data)[(r * w.cols + c) / 2];
    code = static_cast<int>(c % 2 == 0 ? byte & 0xf : byte >> 4) - 8;  // element 2j low, 2j+1 high
  }
  const int64_t g = r * w.groups_per_row() + c / w.group;
  const float scale = half_to_float(w.scales[g]);
  if (w.offsets) return std::fma(static_cast<float>(code), scale, w.offsets[g]);  // one rounding
  return static_cast<float>(code) * scale;  // exact: <= 8 + 11 significant bits
}

void linear(const WeightMatrix& w, const float* x, int64_t m, const void* bias, DType bias_dtype, float* y) {
  validate_weight(w, "linear");
  std::vector<float> row(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t c = 0; c < w.cols; ++c) row[static_cast<size_t>(c)] = weight_at(w, r, c);
    const double b = bias ? load_float(bias, bias_dtype, r) : 0.0;
    for (int64_t i = 0; i < m; ++i) {
      double s = 0;
      for (int64_t c = 0; c < w.cols; ++c) s += static_cast<double>(x[i * w.cols + c]) * row[static_cast<size_t>(c)];
      y[i * w.rows + r] = static_cast<float>(s + b);
    }
  }
}

void embedding(const void* table, DType table_dtype, int64_t dim, const int32_t* ids, int64_t n, bool accumulate,
               float* out) {
  for (int64_t i = 0; i < n; ++i) {
    FS_ASSERT(ids[i] >= 0, "negative token id reached embedding");
    for (int64_t d = 0; d < dim; ++d) {
      const float v = load_float(table, table_dtype, static_cast<int64_t>(ids[i]) * dim + d);
      out[i * dim + d] = accumulate ? out[i * dim + d] + v : v;
    }
  }
}

void layer_norm(const float* x, int64_t m, int64_t n, const void* gamma, const void* beta, DType param_dtype,
                float eps, float* y) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * n;
    double mean = 0, var = 0;
    for (int64_t j = 0; j < n; ++j) mean += xi[j];
    mean /= static_cast<double>(n);
    for (int64_t j = 0; j < n; ++j) var += (xi[j] - mean) * (xi[j] - mean);
    var /= static_cast<double>(n);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t j = 0; j < n; ++j) {
      const double g = gamma ? load_float(gamma, param_dtype, j) : 1.0;
      const double b = beta ? load_float(beta, param_dtype, j) : 0.0;
      y[i * n + j] = static_cast<float>((xi[j] - mean) * inv * g + b);
    }
  }
}

void rms_norm(const float* x, int64_t m, int64_t n, const void* gamma, DType param_dtype, float eps, float* y) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * n;
    double ss = 0;
    for (int64_t j = 0; j < n; ++j) ss += static_cast<double>(xi[j]) * xi[j];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + eps);
    for (int64_t j = 0; j < n; ++j) {
      const double g = gamma ? load_float(gamma, param_dtype, j) : 1.0;
      y[i * n + j] = static_cast<float>(xi[j] * inv * g);
    }
  }
}

float activate(Activation kind, float x) { return static_cast<float>(act(kind, x)); }

void activation(Activation kind, float* x, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] = activate(kind, x[i]);
}

void gated_activation(Activation kind, const float* gate_up, int64_t m, int64_t n, float* out) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      out[i * n + j] = static_cast<float>(act(kind, gate_up[i * 2 * n + j]) * gate_up[i * 2 * n + n + j]);
}

void add(float* x, const float* y, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] += y[i];
}

void softmax(const float* x, int64_t m, int64_t n, float* y) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * n;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, static_cast<double>(xi[j]));
    double sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += std::exp(xi[j] - mx);
    for (int64_t j = 0; j < n; ++j) y[i * n + j] = static_cast<float>(std::exp(xi[j] - mx) / sum);
  }
}

void rotary(float* q, float* k, const int32_t* positions, int64_t n_tokens, int n_heads, int n_kv_heads,
            int head_dim, int rotary_dim, const float* inv_freq) {
  FS_ASSERT(rotary_dim % 2 == 0 && rotary_dim <= head_dim, "rotary_dim must be even and <= head_dim");
  const int half = rotary_dim / 2;
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int i = 0; i < half; ++i) {
      const float theta = static_cast<float>(positions[t]) * inv_freq[i];
      const double c = std::cos(static_cast<double>(theta)), s = std::sin(static_cast<double>(theta));
      auto rot = [&](float* v) {
        const double a = v[i], b = v[i + half];
        v[i] = static_cast<float>(a * c - b * s);
        v[i + half] = static_cast<float>(b * c + a * s);
      };
      for (int h = 0; h < n_heads; ++h) rot(q + (t * n_heads + h) * head_dim);
      for (int h = 0; h < n_kv_heads; ++h) rot(k + (t * n_kv_heads + h) * head_dim);
    }
  }
}

int64_t cache_row(const PagedAttention& p, int seq, int64_t pos) {
  const int32_t block = p.block_table[static_cast<int64_t>(seq) * p.max_blocks + pos / p.block_size];
  FS_ASSERT(block >= 0, "negative block id in block table");
  return static_cast<int64_t>(block) * p.block_size + pos % p.block_size;
}

void write_kv(const PagedAttention& p, const float* k, const float* v, float* k_cache, float* v_cache) {
  validate_attention(p);
  const int64_t row = static_cast<int64_t>(p.n_kv_heads) * p.head_dim;
  for (int s = 0; s < p.n_seqs; ++s) {
    const int32_t q0 = p.query_start[s], nq = p.query_start[s + 1] - q0;
    for (int32_t i = 0; i < nq; ++i) {
      const int64_t pos = p.context_len[s] - nq + i;
      const int64_t dst = cache_row(p, s, pos) * row;
      for (int64_t e = 0; e < row; ++e) {
        k_cache[dst + e] = k[(q0 + i) * row + e];
        v_cache[dst + e] = v[(q0 + i) * row + e];
      }
    }
  }
}

void attention(const PagedAttention& p, const float* q, const float* k_cache, const float* v_cache, float* out) {
  validate_attention(p);
  const int group = p.n_heads / p.n_kv_heads;
  const int64_t hd = p.head_dim, kv_row = static_cast<int64_t>(p.n_kv_heads) * hd;
  std::vector<double> score, acc(static_cast<size_t>(hd));
  for (int s = 0; s < p.n_seqs; ++s) {
    const int32_t q0 = p.query_start[s], nq = p.query_start[s + 1] - q0;
    for (int32_t i = 0; i < nq; ++i) {
      const int64_t pos = p.context_len[s] - nq + i;
      const int64_t lo = p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
      for (int h = 0; h < p.n_heads; ++h) {
        const float* qh = q + ((q0 + i) * static_cast<int64_t>(p.n_heads) + h) * hd;
        const int64_t kvh = h / group;
        score.assign(static_cast<size_t>(pos - lo + 1), 0.0);
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t t = lo; t <= pos; ++t) {
          const float* kt = k_cache + cache_row(p, s, t) * kv_row + kvh * hd;
          double d = 0;
          for (int64_t e = 0; e < hd; ++e) d += static_cast<double>(qh[e]) * kt[e];
          score[static_cast<size_t>(t - lo)] = d * p.scale;
          mx = std::max(mx, d * p.scale);
        }
        double sum = 0;
        for (double& sc : score) sum += (sc = std::exp(sc - mx));
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t t = lo; t <= pos; ++t) {
          const float* vt = v_cache + cache_row(p, s, t) * kv_row + kvh * hd;
          const double w = score[static_cast<size_t>(t - lo)] / sum;
          for (int64_t e = 0; e < hd; ++e) acc[static_cast<size_t>(e)] += w * vt[e];
        }
        float* o = out + ((q0 + i) * static_cast<int64_t>(p.n_heads) + h) * hd;
        for (int64_t e = 0; e < hd; ++e) o[e] = static_cast<float>(acc[static_cast<size_t>(e)]);
      }
    }
  }
}

}  // namespace fineserve::cpu::ref
