// Environment overrides of `fineserve serve` (the one place that reads them; docs/api.md):
//   FINESERVE_API_KEY   the API key, as --api-key gives it (a secret is better kept out of the
//                       command line, which other users of the machine can read)
#pragma once

#include <optional>
#include <string>

namespace fineserve {

// The key, or nullopt when the variable is unset or empty.
std::optional<std::string> api_key_from_env();

}  // namespace fineserve
