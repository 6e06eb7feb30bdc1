// Collectives between the ranks of a tensor-parallel group (DESIGN: Tensor parallelism).
//
// Every buffer is device memory of the rank's backend (host memory for the CPU backend) holding
// `count` elements of `dtype`. Every rank of the group must call the same collectives in the same
// order with the same count and dtype; a call returns when this rank's part is done and its
// buffers may be reused.
//
// No collective waits forever: when the other ranks do not arrive within the group's timeout,
// or one of them has failed, the call throws CommError and the communicator (and the group) is
// unusable afterwards: a tensor-parallel group that lost a rank cannot recover mid-step, so the
// caller is expected to end the process (or the in-process group) and not retry.
//
// Implementations: kernels/cpu/inproc_communicator.h (ranks are threads of one process, for CPU
// tensor parallelism and tests) and kernels/cuda/nccl_communicator.h (NCCL, one GPU per rank).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/base.h"
#include "kernels/dtype.h"

namespace fineserve {

// A collective that timed out or whose group has failed. The group is unusable afterwards.
class CommError : public Error {
 public:
  using Error::Error;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual std::string name() const = 0;

  // buf[i] = Σ_ranks buf[i], in place. dtype: F32, F16 or BF16.
  virtual void all_reduce_sum(void* buf, int64_t count, DType dtype) = 0;
  // recv[r * count + i] = send_of_rank_r[i]: recv holds world() * count elements. send may be
  // recv + rank() * count (in place).
  virtual void all_gather(const void* send, void* recv, int64_t count, DType dtype) = 0;
  // buf = root's buf on every rank. Any dtype.
  virtual void broadcast(void* buf, int64_t count, DType dtype, int root) = 0;
  // Returns once every rank has called barrier().
  virtual void barrier() = 0;
};

// ---- NCCL -------------------------------------------------------------------------------------
// Defined in kernels/cuda/nccl_communicator.cpp in a CUDA build; in a build without CUDA they
// throw fineserve::Error saying so. Declared here so that the layers above can set up an NCCL
// group without depending on CUDA headers.

// The opaque NCCL unique id (ncclUniqueId, 128 bytes) that rank 0 makes and every other rank
// receives out of band (over the TCP bootstrap, engine/tp_net.h) before joining the group.
std::vector<uint8_t> nccl_unique_id();

struct NcclOptions {
  std::vector<uint8_t> unique_id;  // from nccl_unique_id() on rank 0
  int rank = 0;
  int world = 1;
  int device = 0;  // the CUDA device this rank uses
  // Bounds ncclCommInitRank and every collective: past it the communicator is aborted
  // (ncclCommAbort) and CommError is thrown.
  std::chrono::milliseconds timeout{std::chrono::minutes(2)};
};

std::unique_ptr<Communicator> make_nccl_communicator(const NcclOptions& options);

// True when this build has NCCL (a CUDA build); whether a GPU is present is another question.
bool nccl_built();

}  // namespace fineserve
