// `fineserve serve` as a process: startup, bad flags, and SIGTERM draining.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <thread>

#include "tests/scratch_dir.h"
#include "server_util.h"

extern char** environ;

namespace fineserve {
namespace {

using json = nlohmann::json;
using namespace fineserve::testing;

// The fineserve binary as a child process, its stdout and stderr collected by a reader thread.
class ServeProcess {
 public:
  explicit ServeProcess(const std::vector<std::string>& args) {
    int fds[2];
    if (::pipe(fds) != 0) return;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    std::vector<std::string> argv_s = {FINESERVE_BINARY};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, FINESERVE_BINARY, &actions, nullptr, argv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    reader_ = std::thread([this, fd = fds[0]] {
      char buf[4096];
      ssize_t n;
      while ((n = ::read(fd, buf, sizeof buf)) > 0) {
        std::lock_guard lk(mu_);
        output_.append(buf, static_cast<size_t>(n));
      }
      ::close(fd);
    });
  }
  ~ServeProcess() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGKILL);
      wait();
    }
    if (reader_.joinable()) reader_.join();
  }
  std::string output() const {
    std::lock_guard lk(mu_);
    return output_;
  }
  // The port from the "listening on http://HOST:PORT" line; 0 while it has not appeared.
  int port() const {
    const std::string out = output();
    const std::string key = "listening on http://127.0.0.1:";
    const size_t at = out.find(key);
    if (at == std::string::npos) return 0;
    return std::atoi(out.c_str() + at + key.size());
  }
  // Exit code (128 + signal when killed).
  int wait() {
    int st = 0;
    ::waitpid(pid_, &st, 0);
    exited_ = true;
    if (reader_.joinable()) reader_.join();
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  std::thread reader_;
  mutable std::mutex mu_;
  std::string output_;
};

TEST(ServeCli, WithoutAModelExplainsAndFails) {
  ServeProcess p({"serve", "--port", "0"});
  EXPECT_NE(p.wait(), 0);
  EXPECT_NE(p.output().find("embedded default model"), std::string::npos) << p.output();
}

TEST(ServeCli, BadInputFails) {
  ServeProcess missing({"serve", "--model", "/nonexistent/model", "--port", "0"});
  EXPECT_NE(missing.wait(), 0);
  ServeProcess bad_config({"serve", "--model", kModelDir.string(), "--config", "/nonexistent/server.json"});
  EXPECT_NE(bad_config.wait(), 0);
  EXPECT_NE(bad_config.output().find("server.json"), std::string::npos) << bad_config.output();
  ServeProcess bad_flag({"serve", "--model", kModelDir.string(), "--max-seqs", "0"});
  EXPECT_NE(bad_flag.wait(), 0);
}

// SIGTERM while requests are in flight: /ready turns 503, new requests are refused, every
// request in flight completes, and the process exits 0.
TEST(ServeCli, SigtermDrainsInFlightRequests) {
  ServeProcess p({"serve", "--model", kModelDir.string(), "--port", "0", "--max-seqs", "1", "--drain-timeout", "120"});
  ASSERT_TRUE(eventually([&] { return p.port() > 0; }, std::chrono::seconds(60))) << p.output();
  httplib::Client c("127.0.0.1", p.port());
  ASSERT_TRUE(eventually([&] { return get(c, "/ready").status == 200; }, std::chrono::seconds(60))) << p.output();

  constexpr int kRequests = 6, kTokens = 120;
  std::vector<StreamReply> replies(kRequests);
  std::atomic<bool> first_token{false};
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i)
    threads.emplace_back([&, i] {
      httplib::Client cc("127.0.0.1", p.port());
      cc.set_read_timeout(std::chrono::seconds(120));
      replies[i] = post_stream(cc, "/generate_stream",
                               json{{"inputs", "And God said " + std::to_string(i)}, {"parameters", {{"max_new_tokens", kTokens}, {"ignore_eos", true}}}},
                               [&](const SseEvent&) {
                                 first_token = true;
                                 return true;
                               });
    });
  ASSERT_TRUE(eventually([&] { return first_token.load(); }, std::chrono::seconds(60)));
  ASSERT_EQ(::kill(p.pid(), SIGTERM), 0);

  // /ready turns 503 (or the process is already gone), and new requests are refused.
  int ready = 200;
  ASSERT_TRUE(eventually([&] {
    ready = get(c, "/ready").status;
    return ready != 200;
  }, std::chrono::seconds(60)));
  if (ready == 503) {
    const Reply r = post(c, "/generate", json{{"inputs", "late"}});
    EXPECT_TRUE(r.status == 503 || r.status == 0) << r.status << " " << r.body;
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(p.wait(), 0) << p.output();
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_EQ(replies[i].status, 200) << i;
    ASSERT_EQ(replies[i].events.size(), static_cast<size_t>(kTokens)) << i << "\n" << replies[i].raw;
    EXPECT_EQ(json::parse(replies[i].events.back().data)["details"]["finish_reason"], "length");
  }
  EXPECT_NE(p.output().find("draining"), std::string::npos) << p.output();
}

// --no-prefix-caching reaches the engine: a repeated prompt reports no cached tokens.
TEST(ServeCli, NoPrefixCachingFlag) {
  for (const bool off : {false, true}) {
    std::vector<std::string> args = {"serve", "--model", kModelDir.string(), "--port", "0"};
    if (off) args.push_back("--no-prefix-caching");
    ServeProcess p(args);
    ASSERT_TRUE(eventually([&] { return p.port() > 0; }, std::chrono::seconds(60))) << p.output();
    httplib::Client c("127.0.0.1", p.port());
    c.set_read_timeout(std::chrono::seconds(60));
    ASSERT_TRUE(eventually([&] { return get(c, "/ready").status == 200; }, std::chrono::seconds(60))) << p.output();
    std::string prompt;
    for (int i = 0; i < 20; ++i) prompt += " hello world";  // 40 tokens: two full 16-token blocks
    const json body = {{"model", "opt-preln"}, {"prompt", prompt}, {"max_tokens", 2}};
    ASSERT_EQ(post(c, "/v1/completions", body).status, 200);
    const Reply r = post(c, "/v1/completions", body);
    ASSERT_EQ(r.status, 200) << r.body;
    const int cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"];
    if (off) {
      EXPECT_EQ(cached, 0);
    } else {
      EXPECT_GT(cached, 0);
    }
  }
}


// The exit bound a supervisor relies on: with requests in flight (more than --drain-timeout can
// finish, one client that never reads), the process exits within --drain-timeout + 1 s of SIGTERM.
// Also: the API key from a key file, vLLM-named metrics, and a second server on the same port
// failing with a clear error.
TEST(ServeCli, ExitsWithinDrainTimeoutPlusOneSecond) {
  ScratchDir dir;
  std::ofstream(dir / "key") << "file-key-123\n";
  ServeProcess p({"serve", "--model", kModelDir.string(), "--port", "0", "--max-seqs", "1", "--drain-timeout", "1",
                  "--api-key-file", (dir / "key").string(), "--vllm-metrics"});
  ASSERT_TRUE(eventually([&] { return p.port() > 0; }, std::chrono::seconds(60))) << p.output();
  httplib::Client c("127.0.0.1", p.port());
  c.set_read_timeout(std::chrono::seconds(60));
  ASSERT_TRUE(eventually([&] { return get(c, "/ready").status == 200; }, std::chrono::seconds(60))) << p.output();
  EXPECT_EQ(post(c, "/generate", json{{"inputs", "x"}}).status, 401);
  EXPECT_NE(get(c, "/metrics").body.find("vllm:num_requests_running{model_name=\"opt-preln\"}"), std::string::npos);

  ServeProcess second({"serve", "--model", kModelDir.string(), "--port", std::to_string(p.port())});
  EXPECT_NE(second.wait(), 0);
  EXPECT_NE(second.output().find("already in use"), std::string::npos) << second.output();

  constexpr int kRequests = 40;
  std::vector<Reply> replies(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i)
    threads.emplace_back([&, i] {
      httplib::Client cc("127.0.0.1", p.port());
      cc.set_read_timeout(std::chrono::seconds(60));
      cc.set_bearer_token_auth("file-key-123");
      // 4 choices of 120 tokens each, one sequence per step: seconds of work in all.
      replies[i] = post(cc, "/v1/completions", json{{"prompt", "And God said " + std::to_string(i)}, {"max_tokens", 120},
                                                    {"n", 4}, {"temperature", 1.0}, {"ignore_eos", true}});
    });
  // A stream whose client never reads.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(p.port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string body = json{{"inputs", "And"}, {"parameters", {{"max_new_tokens", 120}, {"ignore_eos", true}}}}.dump();
  const std::string req = "POST /generate_stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer file-key-123\r\n"
                          "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  ASSERT_EQ(::send(fd, req.data(), req.size(), MSG_NOSIGNAL), static_cast<ssize_t>(req.size()));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));

  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(p.pid(), SIGTERM), 0);
  const int code = p.wait();
  const double exit_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (auto& t : threads) t.join();
  ::close(fd);
  std::printf("exit %.3f s after SIGTERM with --drain-timeout 1 and %d requests in flight\n", exit_s, kRequests + 1);
  ::testing::Test::RecordProperty("exit_after_sigterm_s", std::to_string(exit_s));
  EXPECT_EQ(code, 0) << p.output();
  EXPECT_LE(exit_s, 2.0) << p.output();
  int unavailable = 0;
  for (const Reply& r : replies) {
    EXPECT_TRUE(r.status == 200 || r.status == 503 || r.status == 0) << r.status << " " << r.body;
    if (r.status == 503) ++unavailable;
  }
  EXPECT_GT(unavailable, 0) << "some requests were still in flight at the drain timeout";
}


// FINESERVE_API_KEY (read in configs/server_env) requires the key like --api-key.
TEST(ServeCli, ApiKeyFromTheEnvironment) {
  ::setenv("FINESERVE_API_KEY", "env-key-9", 1);
  ServeProcess p({"serve", "--model", kModelDir.string(), "--port", "0"});
  ::unsetenv("FINESERVE_API_KEY");
  ASSERT_TRUE(eventually([&] { return p.port() > 0; }, std::chrono::seconds(60))) << p.output();
  httplib::Client c("127.0.0.1", p.port());
  c.set_read_timeout(std::chrono::seconds(60));
  ASSERT_TRUE(eventually([&] { return get(c, "/ready").status == 200; }, std::chrono::seconds(60))) << p.output();
  EXPECT_EQ(post(c, "/generate", json{{"inputs", "x"}, {"parameters", {{"max_new_tokens", 1}}}}).status, 401);
  c.set_bearer_token_auth("env-key-9");
  EXPECT_EQ(post(c, "/generate", json{{"inputs", "x"}, {"parameters", {{"max_new_tokens", 1}}}}).status, 200);
  ::kill(p.pid(), SIGTERM);
  EXPECT_EQ(p.wait(), 0) << p.output();
}

}  // namespace
}  // namespace fineserve
