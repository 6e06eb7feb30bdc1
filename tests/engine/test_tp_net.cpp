// The tensor-parallel plan codec and the TCP bootstrap/control channel over loopback: id exchange,
// step plans in order, shutdown, and every failure ending within its timeout (a rank that never
// connects, a worker that dies or hangs, rank 0 going away).
#include <atomic>
#include <chrono>
#include <thread>

#include <gtest/gtest.h>

#include "engine/tp.h"
#include "engine/tp_net.h"

namespace fineserve {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

StepInput sample_step(int k) {
  StepInput s;
  s.token_ids = {k, 2, 3, 4};
  s.positions = {0, 1, 2, 7};
  s.query_start = {0, 3, 4};
  s.context_len = {3, 8};
  s.max_blocks = 2;
  s.block_table = {0, -1, 1, 2};
  s.logit_rows = {2, 3};
  return s;
}

void expect_same(const StepInput& a, const StepInput& b) {
  EXPECT_EQ(a.token_ids, b.token_ids);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(a.query_start, b.query_start);
  EXPECT_EQ(a.context_len, b.context_len);
  EXPECT_EQ(a.block_table, b.block_table);
  EXPECT_EQ(a.max_blocks, b.max_blocks);
  EXPECT_EQ(a.logit_rows, b.logit_rows);
}

TpMessage step_message(int k) {
  TpMessage m;
  m.step = sample_step(k);
  return m;
}

TEST(TpCodec, RoundTripsEveryKind) {
  const std::vector<int32_t> w = encode_tp_message(step_message(9));
  const TpMessage back = decode_tp_message(w.data(), w.size());
  EXPECT_EQ(back.kind, TpMessage::Kind::Step);
  expect_same(back.step, sample_step(9));

  TpMessage kv;
  kv.kind = TpMessage::Kind::AllocateKv;
  kv.num_blocks = 100;
  kv.block_size = 16;
  const auto kw = encode_tp_message(kv);
  const TpMessage kb = decode_tp_message(kw.data(), kw.size());
  EXPECT_EQ(kb.kind, TpMessage::Kind::AllocateKv);
  EXPECT_EQ(kb.num_blocks, 100);
  EXPECT_EQ(kb.block_size, 16);

  TpMessage bye;
  bye.kind = TpMessage::Kind::Shutdown;
  const auto bw = encode_tp_message(bye);
  EXPECT_EQ(decode_tp_message(bw.data(), bw.size()).kind, TpMessage::Kind::Shutdown);
}

TEST(TpCodec, RejectsMalformedMessages) {
  std::vector<int32_t> w = encode_tp_message(step_message(1));
  EXPECT_THROW(decode_tp_message(w.data(), w.size() - 1), Error);  // truncated
  w.push_back(0);
  EXPECT_THROW(decode_tp_message(w.data(), w.size()), Error);  // trailing word
  const int32_t unknown[] = {42};
  EXPECT_THROW(decode_tp_message(unknown, 1), Error);
  const int32_t negative[] = {1, -1, 0, 0, 0, 0};
  EXPECT_THROW(decode_tp_message(negative, 6), Error);
  EXPECT_THROW(decode_tp_message(nullptr, 0), Error);
}

TEST(TpNet, ParsesHostPort) {
  EXPECT_EQ(parse_host_port("10.0.0.1:29500"), (std::pair<std::string, int>{"10.0.0.1", 29500}));
  EXPECT_EQ(parse_host_port("node-3:1"), (std::pair<std::string, int>{"node-3", 1}));
  for (const char* bad : {"", "host", "host:", ":80", "host:0", "host:65536", "host:8x"})
    EXPECT_THROW(parse_host_port(bad), Error) << bad;
}

TpNetOptions fast(int world) {
  TpNetOptions o;
  o.world = world;
  o.connect_timeout = 5s;
  o.heartbeat_interval = 20ms;
  o.heartbeat_timeout = 400ms;
  return o;
}

TEST(TpNet, BootstrapsPlansAndShutsDown) {
  const int world = 3;
  TpCoordinator coord("127.0.0.1", 0, fast(world));
  ASSERT_GT(coord.port(), 0);
  const std::vector<uint8_t> blob = {1, 2, 3, 250, 0, 7};
  std::vector<std::vector<int>> seen(world);
  std::vector<std::thread> workers;
  for (int r = 1; r < world; ++r)
    workers.emplace_back([&, r] {
      TpWorkerLink link("127.0.0.1", coord.port(), r, fast(world));
      EXPECT_EQ(link.blob(), blob);
      link.ready();
      for (;;) {
        const TpMessage m = link.receive();
        if (m.kind == TpMessage::Kind::Shutdown) break;
        seen[static_cast<size_t>(r)].push_back(m.step.token_ids[0]);
        expect_same(m.step, sample_step(m.step.token_ids[0]));
      }
    });
  coord.accept_workers(blob);
  coord.wait_ready(5s);
  for (int k = 0; k < 50; ++k) coord.send(encode_tp_message(step_message(k)));
  std::this_thread::sleep_for(100ms);  // idle: heartbeats keep the group alive
  coord.send(encode_tp_message(step_message(50)));
  EXPECT_FALSE(coord.failed());
  coord.close();  // returns once every worker has been told (a hang ends at ctest's timeout)
  for (auto& t : workers) t.join();
  std::vector<int> expected;
  for (int k = 0; k <= 50; ++k) expected.push_back(k);
  for (int r = 1; r < world; ++r) EXPECT_EQ(seen[static_cast<size_t>(r)], expected);
}

TEST(TpNet, ARankThatNeverConnectsFailsTheBootstrap) {
  TpNetOptions o = fast(3);
  o.connect_timeout = 300ms;
  TpCoordinator coord("127.0.0.1", 0, o);
  std::thread w([&] {
    try {
      TpWorkerLink link("127.0.0.1", coord.port(), 1, o);
    } catch (const Error&) {  // rank 0 gives up on the group and hangs up
    }
  });
  try {
    coord.accept_workers({});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank(s) 2 did not connect"), std::string::npos) << e.what();
  }
  coord.close();
  w.join();
}

TEST(TpNet, AWorkerWithAnotherWorldSizeIsRefused) {
  TpCoordinator coord("127.0.0.1", 0, fast(2));
  std::thread w([&] {
    try {
      TpWorkerLink link("127.0.0.1", coord.port(), 1, fast(4));
    } catch (const Error&) {
    }
  });
  try {
    coord.accept_workers({});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--tp 4 but the coordinator has --tp 2"), std::string::npos) << e.what();
  }
  coord.close();
  w.join();
}

TEST(TpNet, AWorkerThatCannotReachRankZeroGivesUp) {
  TpNetOptions o = fast(2);
  o.connect_timeout = 300ms;
  // A port nobody listens on: bind one, then close it.
  int port = 0;
  {
    TpCoordinator probe("127.0.0.1", 0, o);
    port = probe.port();
  }
  EXPECT_THROW(TpWorkerLink("127.0.0.1", port, 1, o), Error);
}

// A worker that goes away (its process died: the connection closes) or hangs (no heartbeats):
// rank 0 calls on_lost within the heartbeat timeout and every later send throws CommError.
void expect_lost(bool hang) {
  const int world = 2;
  TpCoordinator coord("127.0.0.1", 0, fast(world));
  std::atomic<bool> lost{false};
  std::string why;
  std::mutex mu;
  coord.set_on_lost([&](const std::string& w) {
    std::lock_guard<std::mutex> lock(mu);
    why = w;
    lost = true;
  });
  std::atomic<bool> release{false};
  std::thread worker([&] {
    TpNetOptions o = fast(world);
    if (hang) o.heartbeat_interval = 1h;  // alive but silent
    TpWorkerLink link("127.0.0.1", coord.port(), 1, o);
    link.ready();
    link.receive();  // the first step; then it dies (the link closes) or hangs
    if (hang)
      while (!release) std::this_thread::sleep_for(5ms);
  });
  coord.accept_workers({9});
  coord.wait_ready(5s);
  coord.send(encode_tp_message(step_message(1)));
  const auto t0 = Clock::now();
  while (!lost && since(t0) < 5.0) std::this_thread::sleep_for(5ms);
  EXPECT_TRUE(lost);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_NE(why.find("rank 1"), std::string::npos) << why;
    EXPECT_NE(why.find(hang ? "sent nothing" : "closed its connection"), std::string::npos) << why;
  }
  EXPECT_TRUE(coord.failed());
  EXPECT_THROW(coord.send(encode_tp_message(step_message(2))), CommError);
  release = true;
  worker.join();
  coord.close();
}

TEST(TpNet, AWorkerThatDiesIsNoticed) { expect_lost(false); }
TEST(TpNet, AWorkerThatHangsIsNoticed) { expect_lost(true); }

TEST(TpNet, WorkersNoticeRankZeroGoingAwayOrHanging) {
  for (bool hang : {false, true}) {
    const int world = 2;
    TpNetOptions o = fast(world);
    if (hang) o.heartbeat_interval = 1h;  // rank 0 alive but silent
    TpCoordinator coord("127.0.0.1", 0, o);
    std::string error;
    std::thread worker([&] {
      TpWorkerLink link("127.0.0.1", coord.port(), 1, fast(world));
      link.ready();
      try {
        for (;;) link.receive();
      } catch (const CommError& e) {
        error = e.what();
      }
    });
    coord.accept_workers({});
    coord.wait_ready(5s);
    if (!hang) coord.abort("a collective timed out");  // the group is broken: the workers must exit
    worker.join();
    EXPECT_NE(error.find(hang ? "rank 0 sent nothing" : "rank 0 closed the connection"), std::string::npos) << error;
    coord.close();
  }
}

}  // namespace
}  // namespace fineserve
