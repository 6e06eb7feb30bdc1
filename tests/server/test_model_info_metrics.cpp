// The metrics' model info (fineserve_model_info) carries the served model's source format, as
// /info does (ModelInfo::source_format: where the quantized weights came from).
#include <gtest/gtest.h>

#include "server/metrics.h"

namespace fineserve {
namespace {

TEST(ModelInfoMetric, CarriesTheSourceFormat) {
  Metrics m;
  ModelInfo info;
  info.architecture = "llama";
  info.quantization = "finequant-int4";
  info.source_format = "gguf:Q4_1,gguf:Q8_0";
  m.set_model_info("smollm2-135m-instruct-q4_1", info);
  const std::string text = m.serialize();
  EXPECT_NE(text.find("fineserve_model_info{"), std::string::npos) << text;
  EXPECT_NE(text.find("source_format=\"gguf:Q4_1,gguf:Q8_0\""), std::string::npos) << text;
  EXPECT_NE(text.find("quantization=\"finequant-int4\""), std::string::npos) << text;
  EXPECT_NE(text.find("model=\"smollm2-135m-instruct-q4_1\""), std::string::npos) << text;
}

}  // namespace
}  // namespace fineserve
