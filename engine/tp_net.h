// The TCP side of multi-process tensor parallelism: bootstrap and control (DESIGN: Tensor
// parallelism). One connection from each rank 1..N-1 to rank 0 (the coordinator) carries:
//
//   worker → rank 0   Hello {rank, world, protocol}      once, on connect
//   rank 0 → worker   Welcome {bootstrap blob}          once, when all N-1 ranks said hello; the
//                                                       blob is the NCCL unique id
//   worker → rank 0   Ready                             once its shard is loaded
//   rank 0 → worker   Message {encoded TpMessage}       every step plan (engine/tp.h), in order
//   both ways         Heartbeat                         every heartbeat_interval
//
// Step plans travel here rather than through an NCCL broadcast: they are small host data, the
// workers must block between steps without a collective timeout, and the same connection tells
// each side at once when the other is gone. Failure handling, all bounded:
//  - a rank that does not connect within connect_timeout: rank 0 throws, naming the missing ranks;
//  - a worker that closes its connection (the process died) or stays silent past
//    heartbeat_timeout: rank 0 marks the group failed, calls on_lost (the server exits non-zero)
//    and every later send() throws CommError;
//  - rank 0 gone or silent: the worker's receive() throws CommError (the worker exits non-zero).
// Frames are {u32 magic, u32 kind, u64 length, payload}, native byte order (the ranks of one
// group run the same binary on the same architecture; the magic catches strangers).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/tp.h"

namespace fineserve {

struct TpNetOptions {
  int world = 1;
  std::chrono::milliseconds connect_timeout{std::chrono::seconds(120)};  // bootstrap
  std::chrono::milliseconds heartbeat_interval{std::chrono::seconds(1)};
  std::chrono::milliseconds heartbeat_timeout{std::chrono::seconds(15)};  // silence = dead
};

// "host:port" -> {host, port}; throws fineserve::Error when malformed.
std::pair<std::string, int> parse_host_port(const std::string& address);

// Rank 0's end: listens, bootstraps the workers, then sends them step plans.
class TpCoordinator final : public StepSender {
 public:
  // Binds host:port (port 0: any free port) and listens; returns at once. Throws fineserve::Error.
  TpCoordinator(const std::string& host, int port, const TpNetOptions& options);
  ~TpCoordinator() override;
  TpCoordinator(const TpCoordinator&) = delete;
  TpCoordinator& operator=(const TpCoordinator&) = delete;

  int port() const { return port_; }
  // Called once, from the monitor thread, when the group loses a rank after accept_workers().
  void set_on_lost(std::function<void(const std::string& why)> on_lost);
  // Waits until ranks 1..world-1 have connected and said hello, hands each `blob`, and starts the
  // heartbeats. Throws fineserve::Error naming the ranks that did not come within connect_timeout.
  void accept_workers(const std::vector<uint8_t>& blob);
  // Waits until every worker has reported Ready (shard loaded). Throws CommError when one is lost
  // or `timeout` passes.
  void wait_ready(std::chrono::milliseconds timeout);
  // True (with the reason) once a rank is lost.
  bool failed(std::string* why = nullptr) const;

  void send(const std::vector<int32_t>& words) override;
  void abort(const std::string& why) noexcept override;
  void close() noexcept override;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

// A worker's end: connects, receives the bootstrap blob, then step plans.
class TpWorkerLink final : public StepReceiver {
 public:
  // Connects to rank 0 at host:port (retrying until connect_timeout: rank 0 may not listen yet),
  // says hello as `rank`, and waits for the blob. Throws fineserve::Error on timeout or refusal.
  TpWorkerLink(const std::string& host, int port, int rank, const TpNetOptions& options);
  ~TpWorkerLink() override;
  TpWorkerLink(const TpWorkerLink&) = delete;
  TpWorkerLink& operator=(const TpWorkerLink&) = delete;

  const std::vector<uint8_t>& blob() const;
  // Tells rank 0 this rank's shard is loaded.
  void ready();
  // The next message; throws CommError when rank 0 closed the connection or fell silent.
  TpMessage receive() override;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace fineserve
