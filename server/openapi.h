// The OpenAPI 3 document of the HTTP API, served at GET /openapi.json. It is docs/openapi.json
// (written by scripts/openapi.py), embedded at build time so the binary serves what is committed.
#pragma once

#include <string_view>

namespace fineserve {

std::string_view openapi_document();

}  // namespace fineserve
