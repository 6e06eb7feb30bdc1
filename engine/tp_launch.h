// Launching a multi-process tensor-parallel group (one process per GPU, NCCL collectives, the TCP
// control channel of engine/tp_net.h):
//
//   rank 0:     launch_tp_rank0()        binds the coordinator port, optionally spawns ranks 1..N-1
//                                        of this node (fork/exec of this binary with --rank R), hands
//                                        out the NCCL unique id, joins NCCL, loads its shard, waits
//                                        for the others' Ready, and returns the TpModel the server runs
//   rank R > 0: run_tp_worker_process()  connects, joins NCCL, loads its shard, runs step plans until
//                                        rank 0 shuts the group down
//
// Every wait is bounded (TpNetOptions, collective_timeout, load_timeout); a rank that dies makes the
// others fail within heartbeat_timeout (or the collective timeout, mid-step).
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/tp.h"
#include "engine/tp_net.h"

namespace fineserve {

struct TpProcessOptions {
  int world = 1;
  int rank = 0;
  std::string coordinator;  // HOST:PORT of rank 0 (rank 0 listens on PORT; HOST is what it binds)
  int device_index = 0;     // this rank's CUDA device
  TpNetOptions net;
  std::chrono::milliseconds collective_timeout{std::chrono::minutes(2)};
  std::chrono::milliseconds load_timeout{std::chrono::minutes(30)};  // for the workers' Ready
  // This rank's backend (on device_index).
  std::function<std::unique_ptr<Backend>()> make_backend;
  // Rank 0 only: when not empty, spawn ranks 1..N-1 as child processes running
  // spawn_argv + {"--rank", R, "--coordinator", "127.0.0.1:PORT"} (argv[0] is replaced by this
  // executable, /proc/self/exe).
  std::vector<std::string> spawn_argv;
  // Rank 0 only: called (from a monitor thread) when the group loses a rank while serving.
  std::function<void(const std::string& why)> on_lost;
};

std::unique_ptr<TpModel> launch_tp_rank0(const std::filesystem::path& path, const TpProcessOptions& options);

// Returns normally when rank 0 shut the group down; throws (fineserve::Error / CommError) on any
// failure, which the caller turns into a non-zero exit.
void run_tp_worker_process(const std::filesystem::path& path, const TpProcessOptions& options);

}  // namespace fineserve
