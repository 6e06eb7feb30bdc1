// load_model: picks the architecture from config.json's model_type, whole or one rank's shard.
#include <memory>

#include "kernels/base.h"
#include "kernels/communicator.h"
#include "models/checkpoint/config.h"
#include "models/llama.h"
#include "models/model.h"
#include "models/opt.h"

namespace fineserve {

std::unique_ptr<Model> load_model(const std::filesystem::path& path, Backend& backend, ShardSpec shard,
                                  Communicator* comm) {
  FS_ASSERT(shard.world >= 1 && shard.rank >= 0 && shard.rank < shard.world);
  FS_ASSERT(shard.world == 1 || (comm && comm->world() == shard.world && comm->rank() == shard.rank),
            "a tensor-parallel shard needs the communicator of its rank");
  auto checkpoint = std::make_unique<ckpt::Checkpoint>(ckpt::Checkpoint::open(path));
  const std::filesystem::path config_path = checkpoint->dir() / "config.json";
  const nlohmann::json config = ckpt::read_json_file(config_path);
  const std::string type = ckpt::model_type(config, config_path.string());
  if (type == "opt") {
    const ckpt::OptConfig c = ckpt::parse_opt_config(config, config_path.string());
    return std::make_unique<OptModel>(std::move(checkpoint), c, backend, shard, comm);
  }
  if (type == "llama" || type == "mistral" || type == "mixtral") {
    const ckpt::LlamaConfig c = ckpt::parse_llama_config(config, config_path.string());
    return std::make_unique<LlamaModel>(std::move(checkpoint), c, backend, shard, comm);
  }
  throw Error(config_path.string() + ": model_type '" + type + "' is not supported (supported: opt, llama, mistral, mixtral)");
}

}  // namespace fineserve
