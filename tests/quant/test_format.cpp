// quant/format.h: the FineQuant format's metadata written and read back, and bad metadata refused.
#include <gtest/gtest.h>

#include "kernels/base.h"
#include "quant/format.h"

namespace fineserve::quant {
namespace {

FormatMetadata mixed() {
  FormatMetadata m;
  m.bits = 8;
  m.expert_bits = 4;
  m.group_mode = "fixed";
  m.alpha = 1.5;
  m.source_fingerprint = "fnv1a64:0123456789abcdef";
  m.groups = {{"model.layers.0.self_attn.q_proj", 128}, {"model.layers.0.block_sparse_moe.experts.0.w1", 64}};
  m.matrix_bits = {{"model.layers.0.self_attn.q_proj", 8}, {"model.layers.0.block_sparse_moe.experts.0.w1", 4}};
  return m;
}

TEST(FineQuantFormat, HeaderMetadataRoundTrips) {
  const FormatMetadata m = mixed();
  const ckpt::Metadata header = to_header_metadata(m);
  EXPECT_EQ(header.at("format"), kFormatName);
  EXPECT_EQ(header.at("quantizer_version"), std::to_string(kQuantizerVersion));
  EXPECT_EQ(header.at("bits"), "8");
  EXPECT_EQ(header.at("expert_bits"), "4");  // some matrices differ from "bits"
  ASSERT_TRUE(is_finequant(header));
  const std::optional<FormatMetadata> back = read_header_metadata(header, "ckpt");
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->bits, 8);
  EXPECT_EQ(back->expert_bits, 4);
  EXPECT_EQ(back->group_mode, "fixed");
  EXPECT_DOUBLE_EQ(back->alpha, 1.5);
  EXPECT_EQ(back->source_fingerprint, m.source_fingerprint);
  EXPECT_EQ(back->groups, m.groups);
  EXPECT_EQ(back->matrix_bits, m.matrix_bits);
  EXPECT_EQ(back->bits_of("model.layers.0.block_sparse_moe.experts.0.w1"), 4);
  EXPECT_EQ(back->bits_of("model.layers.1.mlp.up_proj"), 8);  // not listed: the default bits
  EXPECT_EQ(back->quantization_name(), "finequant-int8,experts-int4");
}

TEST(FineQuantFormat, UniformBitsWriteNoPerMatrixBits) {
  FormatMetadata m = mixed();
  m.expert_bits = 0;
  for (auto& [stem, b] : m.matrix_bits) b = 8;
  const ckpt::Metadata header = to_header_metadata(m);
  EXPECT_EQ(header.count("matrix_bits"), 0u);
  EXPECT_EQ(header.count("expert_bits"), 0u);
  const nlohmann::json qc = to_quantization_config(m);
  EXPECT_EQ(qc.at("quant_method"), "finequant");
  EXPECT_EQ(qc.at("format"), kFormatName);
  EXPECT_EQ(qc.at("bits"), 8);
  EXPECT_EQ(qc.at("groups").at("model.layers.0.self_attn.q_proj"), 128);
  EXPECT_FALSE(qc.contains("matrix_bits"));
  EXPECT_EQ(read_header_metadata(header, "ckpt")->quantization_name(), "finequant-int8");
}

TEST(FineQuantFormat, MatrixLayoutFollowsTheBits) {
  EXPECT_EQ((MatrixFormat{8, 64}.code_dtype()), DType::I8);
  EXPECT_EQ((MatrixFormat{4, 64}.code_dtype()), DType::U8);
  EXPECT_EQ((MatrixFormat{8, 64}.code_row_bytes(256)), 256);
  EXPECT_EQ((MatrixFormat{4, 64}.code_row_bytes(256)), 128);
  EXPECT_EQ((MatrixFormat{4, 64}.groups_per_row(256)), 4);
  EXPECT_EQ(codes_name("x.fc1"), "x.fc1.qweight");
  EXPECT_EQ(scales_name("x.fc1"), "x.fc1.scales");
  EXPECT_EQ(offsets_name("x.fc1"), "x.fc1.offsets");
  EXPECT_EQ(kOffsetDType, DType::F32);
  EXPECT_FALSE((MatrixFormat{4, 64}.asymmetric));  // symmetric is the default
}

TEST(FineQuantFormat, SourceFormatsRoundTripAndSummarise) {
  FormatMetadata m = mixed();
  EXPECT_EQ(m.source_format_summary(), "finequant");  // nothing listed: FineQuant's own quantizer
  m.groups = {{"a", 32}, {"b", 32}, {"c", 32}};
  m.source_formats = {{"a", "gguf:Q4_1"}, {"b", "gguf:Q4_1"}, {"c", "gguf:Q8_0"}};
  const ckpt::Metadata header = to_header_metadata(m);
  EXPECT_EQ(header.at("format_version"), std::to_string(kFormatVersion));
  const std::optional<FormatMetadata> back = read_header_metadata(header, "ckpt");
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->source_formats, m.source_formats);
  EXPECT_EQ(back->source_format_of("a"), "gguf:Q4_1");
  EXPECT_EQ(back->source_format_of("zzz"), "finequant");
  EXPECT_EQ(back->source_format_summary(), "gguf:Q4_1,gguf:Q8_0");  // most matrices first
  EXPECT_EQ(to_quantization_config(m).at("source_formats").at("c"), "gguf:Q8_0");
  EXPECT_EQ(to_quantization_config(m).at("format_version"), kFormatVersion);
}

TEST(FineQuantFormat, OldCheckpointsLoadAndNewerVersionsAreRefused) {
  ckpt::Metadata header = to_header_metadata(mixed());
  header.erase("format_version");  // written before version 2: symmetric, no source formats
  const std::optional<FormatMetadata> old = read_header_metadata(header, "ckpt");
  ASSERT_TRUE(old.has_value());
  EXPECT_TRUE(old->source_formats.empty());
  EXPECT_EQ(old->source_format_summary(), "finequant");
  header["format_version"] = "1";
  EXPECT_TRUE(read_header_metadata(header, "ckpt").has_value());
  header["format_version"] = std::to_string(kFormatVersion + 1);
  EXPECT_THROW(read_header_metadata(header, "ckpt"), Error);
  header["format_version"] = "two";
  EXPECT_THROW(read_header_metadata(header, "ckpt"), Error);
}

TEST(FineQuantFormat, DenseAndBadMetadata) {
  EXPECT_FALSE(read_header_metadata({{"format", "pt"}}, "ckpt").has_value());
  EXPECT_FALSE(read_header_metadata({}, "ckpt").has_value());
  auto expect_error = [](ckpt::Metadata header, const std::string& needle) {
    try {
      read_header_metadata(header, "ckpt");
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).rfind("ckpt: ", 0), 0u) << e.what();
    }
  };
  const ckpt::Metadata good = to_header_metadata(mixed());
  ckpt::Metadata bad = good;
  bad["bits"] = "3";
  expect_error(bad, "no valid 'bits'");
  bad = good;
  bad.erase("bits");
  expect_error(bad, "no valid 'bits'");
  bad = good;
  bad["matrix_bits"] = R"({"a": 5})";
  expect_error(bad, "'matrix_bits' gives a 5 bits");
  bad = good;
  bad["matrix_bits"] = "[1, 2]";
  expect_error(bad, "'matrix_bits' is not a JSON object");
  bad = good;
  bad["groups"] = "{";
  expect_error(bad, "'groups' is not valid JSON");
  bad = good;
  bad["groups"] = R"({"a": -1})";
  expect_error(bad, "'groups' gives a the group -1");
  bad = good;
  bad["expert_bits"] = "16";
  expect_error(bad, "'expert_bits' is '16'");
  bad = good;
  bad["source_formats"] = R"({"a": 3})";
  expect_error(bad, "'source_formats' gives a 3");
  bad = good;
  bad["format_version"] = "99";
  expect_error(bad, "newer than this FineServe reads");
}

}  // namespace
}  // namespace fineserve::quant
