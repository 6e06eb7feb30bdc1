// Running the fineserve binary from tests, in a scratch directory that is removed afterwards.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include <nlohmann/json.hpp>
#include "tests/scratch_dir.h"

namespace fineserve::testing {

struct CommandResult {
  int status = -1;     // exit code
  std::string output;  // stdout and stderr together
};

inline CommandResult run_fineserve(const std::string& args) {
  const std::string cmd = std::string(FINESERVE_BINARY) + " " + args + " 2>&1";
  CommandResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
  return r;
}

// ScratchDir: tests/scratch_dir.h

// A small OPT config (real structure, tiny sizes) written into dir/config.json; returns its path.
inline std::filesystem::path write_tiny_opt_config(const std::filesystem::path& dir, int hidden = 128, int layers = 2,
                                                   int ffn = 256) {
  nlohmann::json c = {{"model_type", "opt"}, {"architectures", {"OPTForCausalLM"}}, {"vocab_size", 512},
                      {"hidden_size", hidden}, {"num_hidden_layers", layers}, {"ffn_dim", ffn},
                      {"num_attention_heads", 4}, {"max_position_embeddings", 64}, {"word_embed_proj_dim", hidden},
                      {"do_layer_norm_before", true}, {"activation_function", "relu"}, {"enable_bias", true},
                      {"layer_norm_elementwise_affine", true}, {"bos_token_id", 2}, {"eos_token_id", 2},
                      {"pad_token_id", 1}, {"torch_dtype", "float16"}};
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "config.json") << c.dump(2);
  return dir / "config.json";
}

}  // namespace fineserve::testing
