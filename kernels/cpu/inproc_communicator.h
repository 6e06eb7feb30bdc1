// An in-process communicator: the ranks of a tensor-parallel group are threads of one process
// sharing host memory (CPU tensor parallelism, and the reference the NCCL path is tested against).
//
//   InprocGroup group(4, std::chrono::seconds(60));
//   // thread r:  Communicator& comm = group.rank(r);  comm.all_reduce_sum(buf, n, DType::F32);
//
// Each collective is two barriers around a copy: every rank publishes its buffer, then rank r
// reduces (or copies) its own slice of the elements for everyone, then all wait until every slice
// is written. Sums run in rank order 0, 1, ..., world - 1 in fp32 whatever the dtype (fp16/bf16 are
// rounded once, at the end), so results are reproducible run to run and do not depend on thread
// timing.
//
// Barriers wait at most the group's timeout; a rank that never arrives makes every waiting rank
// throw CommError naming the missing ranks, and the group stays failed (abort() does the same on
// demand, e.g. when a rank's thread died of another error).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "kernels/communicator.h"

namespace fineserve {

class InprocGroup {
 public:
  InprocGroup(int world, std::chrono::milliseconds timeout);
  ~InprocGroup();
  InprocGroup(const InprocGroup&) = delete;
  InprocGroup& operator=(const InprocGroup&) = delete;

  int world() const;
  // The communicator of rank r, owned by the group; one thread at a time may use it.
  Communicator& rank(int r);
  // Fails the group: every rank waiting in a collective, and every later call, throws CommError
  // with `why`. Idempotent (the first reason is kept).
  void abort(const std::string& why);
  bool failed() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
  std::vector<std::unique_ptr<Communicator>> comms_;
};

}  // namespace fineserve
