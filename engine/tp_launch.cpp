#include "engine/tp_launch.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <thread>

#include "kernels/base.h"

namespace fineserve {
namespace {

using Clock = std::chrono::steady_clock;

// Rank 0's StepSender for a process group: the coordinator, plus the child processes it spawned
// (reaped on close, killed if they do not exit in time).
class ProcessGroup final : public StepSender {
 public:
  explicit ProcessGroup(std::unique_ptr<TpCoordinator> coordinator) : coord_(std::move(coordinator)) {}
  ~ProcessGroup() override { close(); }

  TpCoordinator& coordinator() { return *coord_; }
  void add_child(pid_t pid) { children_.push_back(pid); }

  void send(const std::vector<int32_t>& words) override { coord_->send(words); }
  void abort(const std::string& why) noexcept override { coord_->abort(why); }
  void close() noexcept override {
    coord_->close();
    // Children that have not exited within the grace period are killed: nothing may outlive rank 0.
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    for (pid_t pid : children_) {
      int status = 0;
      while (::waitpid(pid, &status, WNOHANG) == 0) {
        if (Clock::now() > deadline) {
          ::kill(pid, SIGKILL);
          ::waitpid(pid, &status, 0);
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    children_.clear();
  }

 private:
  std::unique_ptr<TpCoordinator> coord_;
  std::vector<pid_t> children_;
};

pid_t spawn_rank(const std::vector<std::string>& argv, int rank, int port) {
  std::vector<std::string> args = argv;
  args.insert(args.end(), {"--rank", std::to_string(rank), "--coordinator", "127.0.0.1:" + std::to_string(port)});
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw Error("tensor parallelism: fork failed for rank " + std::to_string(rank));
  if (pid == 0) {
    // The child dies with rank 0 (belt and braces: the control connection tells it too).
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(1);
    // Signals blocked by the server's main thread must not stay blocked in the worker.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execv("/proc/self/exe", cargs.data());
    ::_exit(127);
  }
  return pid;
}

}  // namespace

std::unique_ptr<TpModel> launch_tp_rank0(const std::filesystem::path& path, const TpProcessOptions& o) {
  FS_ASSERT(o.rank == 0 && o.world >= 1 && o.make_backend);
  const auto [host, port] = o.coordinator.empty() ? std::pair<std::string, int>{"127.0.0.1", 0}
                                                  : parse_host_port(o.coordinator);
  // The backend first: a device that cannot be used fails before any process is spawned.
  std::unique_ptr<Backend> backend = o.make_backend();
  TpNetOptions net = o.net;
  net.world = o.world;
  auto group = std::make_unique<ProcessGroup>(std::make_unique<TpCoordinator>(host, port, net));
  TpCoordinator& coord = group->coordinator();
  for (int r = 1; r < o.world && !o.spawn_argv.empty(); ++r) group->add_child(spawn_rank(o.spawn_argv, r, coord.port()));
  const std::vector<uint8_t> id = nccl_unique_id();
  coord.accept_workers(id);
  if (o.on_lost) coord.set_on_lost(o.on_lost);
  NcclOptions nccl;
  nccl.unique_id = id;
  nccl.rank = 0;
  nccl.world = o.world;
  nccl.device = o.device_index;
  nccl.timeout = o.collective_timeout;
  std::unique_ptr<Communicator> comm = make_nccl_communicator(nccl);
  std::unique_ptr<Model> shard = load_model(path, *backend, {0, o.world}, comm.get());
  coord.wait_ready(o.load_timeout);
  // The communicator must outlive the shard and go before the backend: a sender that owns it.
  struct Owning final : StepSender {
    std::unique_ptr<ProcessGroup> group;
    std::unique_ptr<Communicator> comm;
    void send(const std::vector<int32_t>& w) override { group->send(w); }
    void abort(const std::string& why) noexcept override { group->abort(why); }
    void close() noexcept override { group->close(); }
  };
  auto sender = std::make_unique<Owning>();
  sender->group = std::move(group);
  sender->comm = std::move(comm);
  return std::make_unique<TpModel>(o.world, std::move(sender), std::move(backend), std::move(shard));
}

void run_tp_worker_process(const std::filesystem::path& path, const TpProcessOptions& o) {
  FS_ASSERT(o.rank >= 1 && o.rank < o.world && o.make_backend);
  if (o.coordinator.empty()) throw Error("tensor-parallel rank " + std::to_string(o.rank) + " needs --coordinator HOST:PORT");
  const auto [host, port] = parse_host_port(o.coordinator);
  TpNetOptions net = o.net;
  net.world = o.world;
  TpWorkerLink link(host, port, o.rank, net);
  std::unique_ptr<Backend> backend = o.make_backend();
  NcclOptions nccl;
  nccl.unique_id = link.blob();
  nccl.rank = o.rank;
  nccl.world = o.world;
  nccl.device = o.device_index;
  nccl.timeout = o.collective_timeout;
  std::unique_ptr<Communicator> comm = make_nccl_communicator(nccl);
  std::unique_ptr<Model> shard = load_model(path, *backend, {o.rank, o.world}, comm.get());
  link.ready();
  run_tp_worker(*shard, link);
}

}  // namespace fineserve
