// load_model: the registry's architecture for config.json's model_type, whole or one rank's shard.
#include <memory>

#include "kernels/base.h"
#include "kernels/communicator.h"
#include "models/checkpoint/config.h"
#include "models/model.h"
#include "models/registry.h"

namespace fineserve {

std::unique_ptr<Model> load_model(const std::filesystem::path& path, Backend& backend, ShardSpec shard,
                                  Communicator* comm) {
  FS_ASSERT(shard.world >= 1 && shard.rank >= 0 && shard.rank < shard.world);
  FS_ASSERT(shard.world == 1 || (comm && comm->world() == shard.world && comm->rank() == shard.rank),
            "a tensor-parallel shard needs the communicator of its rank");
  auto checkpoint = std::make_unique<ckpt::Checkpoint>(ckpt::Checkpoint::open(path));
  const std::filesystem::path config_path = checkpoint->dir() / "config.json";
  const nlohmann::json config = ckpt::read_json_file(config_path);
  const Architecture& arch = find_architecture(config, config_path.string());
  return arch.load(std::move(checkpoint), config, config_path.string(), backend, shard, comm);
}

}  // namespace fineserve
