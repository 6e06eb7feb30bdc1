#include "models/registry.h"

#include "kernels/base.h"
#include "models/checkpoint/config.h"

namespace fineserve {
namespace {

struct Registered {
  const char* model_type;
  const Architecture* architecture;
};

// The one table: a new architecture adds its line here.
const Registered kRegistry[] = {
    {"opt", &kOptArchitecture},
    {"llama", &kLlamaArchitecture},
    {"mistral", &kLlamaArchitecture},
    {"mixtral", &kLlamaArchitecture},
    {"qwen2", &kLlamaArchitecture},
};

}  // namespace

uint64_t ArchitectureShape::kv_bytes_per_token(uint64_t dtype_bytes) const {
  return fineserve::kv_bytes_per_token(n_layers, n_kv_heads * head_dim, dtype_bytes);
}

std::string supported_model_types() {
  std::string out;
  for (const Registered& r : kRegistry) out += (out.empty() ? "" : ", ") + std::string(r.model_type);
  return out;
}

const Architecture& find_architecture(const nlohmann::json& config, const std::string& source) {
  const std::string type = ckpt::model_type(config, source);
  for (const Registered& r : kRegistry)
    if (type == r.model_type) return *r.architecture;
  throw Error(source + ": model_type '" + type + "' is not supported (supported: " + supported_model_types() + ")");
}

}  // namespace fineserve
