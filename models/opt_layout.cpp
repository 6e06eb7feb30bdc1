#include "models/opt_layout.h"

namespace fineserve {

std::vector<TensorSpec> opt_tensor_specs(const ckpt::OptConfig& c) {
  using Init = TensorSpec::Init;
  const int64_t h = c.hidden_size, e = c.word_embed_proj_dim, f = c.ffn_dim;
  std::vector<TensorSpec> specs;
  auto add = [&](std::string name, std::vector<int64_t> shape, Init init, bool linear = false) {
    specs.push_back({std::move(name), std::move(shape), init, linear});
  };
  auto add_norm = [&](const std::string& prefix) {
    if (!c.layer_norm_elementwise_affine) return;
    add(prefix + ".weight", {h}, Init::Ones);
    add(prefix + ".bias", {h}, Init::Zeros);
  };
  auto add_linear = [&](const std::string& prefix, int64_t out, int64_t in) {
    add(prefix + ".weight", {out, in}, Init::Normal, true);
    if (c.enable_bias) add(prefix + ".bias", {out}, Init::Zeros);
  };

  const std::string d = "model.decoder.";
  add(d + "embed_tokens.weight", {c.vocab_size, e}, Init::Normal);
  add(d + "embed_positions.weight", {c.max_position_embeddings + ckpt::OptConfig::kPositionOffset, h}, Init::Normal);
  if (e != h) {
    add(d + "project_out.weight", {e, h}, Init::Normal, true);
    add(d + "project_in.weight", {h, e}, Init::Normal, true);
  }
  if (c.has_final_layer_norm()) add_norm(d + "final_layer_norm");
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = d + "layers." + std::to_string(i) + ".";
    add_linear(p + "self_attn.k_proj", h, h);
    add_linear(p + "self_attn.v_proj", h, h);
    add_linear(p + "self_attn.q_proj", h, h);
    add_linear(p + "self_attn.out_proj", h, h);
    add_norm(p + "self_attn_layer_norm");
    add_linear(p + "fc1", f, h);
    add_linear(p + "fc2", h, f);
    add_norm(p + "final_layer_norm");
  }
  return specs;
}

}  // namespace fineserve
