// load_model: picks the architecture from config.json's model_type.
#include <memory>

#include "kernels/base.h"
#include "models/checkpoint/config.h"
#include "models/model.h"
#include "models/llama.h"
#include "models/opt.h"

namespace fineserve {

std::unique_ptr<Model> load_model(const std::filesystem::path& path, Backend& backend) {
  auto checkpoint = std::make_unique<ckpt::Checkpoint>(ckpt::Checkpoint::open(path));
  const std::filesystem::path config_path = checkpoint->dir() / "config.json";
  const nlohmann::json config = ckpt::read_json_file(config_path);
  const std::string type = ckpt::model_type(config, config_path.string());
  if (type == "opt") {
    const ckpt::OptConfig c = ckpt::parse_opt_config(config, config_path.string());
    return std::make_unique<OptModel>(std::move(checkpoint), c, backend);
  }
  if (type == "llama" || type == "mistral" || type == "mixtral") {
    const ckpt::LlamaConfig c = ckpt::parse_llama_config(config, config_path.string());
    return std::make_unique<LlamaModel>(std::move(checkpoint), c, backend);
  }
  throw Error(config_path.string() + ": model_type '" + type + "' is not supported (supported: opt, llama, mistral, mixtral)");
}

}  // namespace fineserve
