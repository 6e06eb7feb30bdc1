#include "models/tp_loader.h"

#include "kernels/base.h"
#include "models/checkpoint/config.h"
#include "models/opt.h"

namespace fineserve {

std::unique_ptr<Model> load_model_shard(const std::filesystem::path& path, Backend& backend, ShardSpec shard,
                                        Communicator* comm) {
  if (shard.world == 1) return load_model(path, backend);
  FS_ASSERT(comm && comm->world() == shard.world && comm->rank() == shard.rank);
  auto checkpoint = std::make_unique<ckpt::Checkpoint>(ckpt::Checkpoint::open(path));
  const std::filesystem::path config_path = checkpoint->dir() / "config.json";
  const nlohmann::json config = ckpt::read_json_file(config_path);
  const std::string type = ckpt::model_type(config, config_path.string());
  if (type == "opt") {
    const ckpt::OptConfig c = ckpt::parse_opt_config(config, config_path.string());
    return std::make_unique<OptModel>(std::move(checkpoint), c, backend, shard, comm);
  }
  throw Error(config_path.string() + ": tensor parallelism (world size " + std::to_string(shard.world) +
              ") is implemented for OPT only so far; model_type '" + type + "' runs with --tp 1");
}

}  // namespace fineserve
