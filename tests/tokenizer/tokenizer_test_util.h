// Helpers shared by the tokenizer tests: the GPT-2 files, the reference data, temp folders.
#pragma once

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "kernels/base.h"
#include "models/tokenizer/hf_config.h"
#include "models/tokenizer/tokenizer.h"
#include "tests/scratch_dir.h"

namespace fineserve::tokenizer_testing {

inline std::filesystem::path gpt2_dir() { return std::filesystem::path(FINESERVE_TEST_DATA) / "gpt2"; }

// tests/data/gpt2/reference.json, written by tests/tokenizer/make_reference.py from HF tokenizers.
inline const nlohmann::json& reference() {
  static const nlohmann::json ref = read_json_file(gpt2_dir() / "reference.json");
  return ref;
}

// The GPT-2 tokenizer from vocab.json + merges.txt, loaded once for all tests.
inline const Tokenizer& gpt2() {
  static const std::unique_ptr<Tokenizer> tok = load_tokenizer(gpt2_dir());
  return *tok;
}

using TempDir = ::fineserve::testing::ScratchDir;  // tests/scratch_dir.h

inline void write_file(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

inline void copy_gpt2_files(const std::filesystem::path& to) {
  for (const char* name : {"vocab.json", "merges.txt"}) {
    std::filesystem::copy_file(gpt2_dir() / name, to / name, std::filesystem::copy_options::overwrite_existing);
  }
}

// Runs `fn` and returns the fineserve::Error message it throws ("" and a test failure if none).
template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a fineserve::Error";
  return "";
}

}  // namespace fineserve::tokenizer_testing
