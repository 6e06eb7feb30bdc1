#include "configs/server_env.h"

#include <cstdlib>

namespace fineserve {

std::optional<std::string> api_key_from_env() {
  const char* v = std::getenv("FINESERVE_API_KEY");
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

}  // namespace fineserve
