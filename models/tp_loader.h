// load_model for one rank of a tensor-parallel group: the architecture's shard of the checkpoint.
#pragma once

#include <filesystem>
#include <memory>

#include "kernels/communicator.h"
#include "models/model.h"
#include "models/weights.h"

namespace fineserve {

// Loads rank shard.rank's part of the checkpoint at `path` onto `backend`; the model runs its
// collectives on `comm` (rank and world matching `shard`), which must outlive it. shard.world == 1
// is plain load_model() and works for every architecture; larger worlds are implemented for OPT.
// Throws fineserve::Error when the model cannot be split that way (heads or FFN not divisible by
// the world size, FineQuant groups that a row-parallel split would cut, an architecture without
// tensor parallelism yet).
std::unique_ptr<Model> load_model_shard(const std::filesystem::path& path, Backend& backend, ShardSpec shard,
                                        Communicator* comm);

}  // namespace fineserve
