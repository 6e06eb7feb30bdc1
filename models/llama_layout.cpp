#include "models/llama_layout.h"

namespace fineserve {

std::vector<TensorSpec> llama_tensor_specs(const ckpt::LlamaConfig& c) {
  using Init = TensorSpec::Init;
  const int64_t h = c.hidden_size, f = c.intermediate_size;
  const int64_t q_dim = c.num_attention_heads * c.head_dim, kv_dim = c.num_key_value_heads * c.head_dim;
  std::vector<TensorSpec> specs;
  auto add = [&](std::string name, std::vector<int64_t> shape, Init init, bool linear = false) {
    specs.push_back({std::move(name), std::move(shape), init, linear});
  };
  auto add_linear = [&](const std::string& prefix, int64_t out, int64_t in, bool bias) {
    add(prefix + ".weight", {out, in}, Init::Normal, true);
    if (bias) add(prefix + ".bias", {out}, Init::Zeros);
  };

  add("model.embed_tokens.weight", {c.vocab_size, h}, Init::Normal);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const bool qkv_bias = c.attention_bias || c.qkv_bias;
    add_linear(p + "self_attn.q_proj", q_dim, h, qkv_bias);
    add_linear(p + "self_attn.k_proj", kv_dim, h, qkv_bias);
    add_linear(p + "self_attn.v_proj", kv_dim, h, qkv_bias);
    add_linear(p + "self_attn.o_proj", h, q_dim, c.attention_bias);
    if (c.is_moe()) {
      // Mixtral: the router, then per expert w1 (gate), w2 (down), w3 (up).
      add(p + "block_sparse_moe.gate.weight", {c.num_local_experts, h}, Init::Normal);
      for (int64_t e = 0; e < c.num_local_experts; ++e) {
        const std::string x = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
        add_linear(x + "w1", f, h, false);
        add_linear(x + "w2", h, f, false);
        add_linear(x + "w3", f, h, false);
      }
    } else {
      add_linear(p + "mlp.gate_proj", f, h, c.mlp_bias);
      add_linear(p + "mlp.up_proj", f, h, c.mlp_bias);
      add_linear(p + "mlp.down_proj", h, f, c.mlp_bias);
    }
    add(p + "input_layernorm.weight", {h}, Init::Ones);
    add(p + "post_attention_layernorm.weight", {h}, Init::Ones);
  }
  add("model.norm.weight", {h}, Init::Ones);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, h}, Init::Normal, true);
  return specs;
}

}  // namespace fineserve
