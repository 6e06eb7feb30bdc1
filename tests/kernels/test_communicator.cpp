// The communicators of kernels/communicator.h: the in-process one for every collective, dtype and
// world size (awkward counts included), its determinism, and its timeouts; NCCL with world size 1
// on a GPU (skipped without one).
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "kernels/communicator.h"
#include "kernels/cpu/inproc_communicator.h"
#include "kernels/half.h"
#include "kernel_test_util.h"

#ifdef FINESERVE_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/dequant.h"
#endif

namespace fineserve {
namespace {

using namespace std::chrono_literals;

// Runs fn(rank, comm) on `world` threads of one group; rethrows the first failure.
void run_group(InprocGroup& group, const std::function<void(int, Communicator&)>& fn) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(group.world()));
  for (int r = 0; r < group.world(); ++r)
    threads.emplace_back([&, r] {
      try {
        fn(r, group.rank(r));
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

float value(int rank, int64_t i) { return static_cast<float>(((rank * 7919 + i * 104729) % 2001) - 1000) / 64.0f; }

// Encodes/decodes values of a float dtype.
std::vector<uint8_t> encode(const std::vector<float>& v, DType t) {
  std::vector<uint8_t> out(v.size() * dtype_size(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::F32) std::memcpy(out.data() + 4 * i, &v[i], 4);
    else {
      const uint16_t h = t == DType::F16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

float decode(const std::vector<uint8_t>& b, size_t i, DType t) {
  if (t == DType::F32) {
    float f;
    std::memcpy(&f, b.data() + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, b.data() + 2 * i, 2);
  return t == DType::F16 ? half_to_float(h) : bf16_to_float(h);
}

const int64_t kCounts[] = {1, 3, 769, 4099};

TEST(InprocCommunicator, AllReduceSumEveryDtypeWorldAndCount) {
  for (DType t : {DType::F32, DType::F16, DType::BF16})
    for (int world : {1, 2, 3, 4})
      for (int64_t n : kCounts) {
        InprocGroup group(world, 10s);
        // Inputs as the dtype holds them; the expected sum in rank order in fp32, rounded once.
        std::vector<std::vector<uint8_t>> bufs;
        for (int r = 0; r < world; ++r) {
          std::vector<float> v(static_cast<size_t>(n));
          for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = value(r, i);
          bufs.push_back(encode(v, t));
        }
        std::vector<float> expected(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
          float acc = decode(bufs[0], static_cast<size_t>(i), t);
          for (int r = 1; r < world; ++r) acc += decode(bufs[static_cast<size_t>(r)], static_cast<size_t>(i), t);
          expected[static_cast<size_t>(i)] = decode(encode({acc}, t), 0, t);
        }
        run_group(group, [&](int r, Communicator& c) {
          EXPECT_EQ(c.rank(), r);
          EXPECT_EQ(c.world(), world);
          c.all_reduce_sum(bufs[static_cast<size_t>(r)].data(), n, t);
        });
        for (int r = 0; r < world; ++r)
          for (int64_t i = 0; i < n; ++i)
            ASSERT_EQ(decode(bufs[static_cast<size_t>(r)], static_cast<size_t>(i), t), expected[static_cast<size_t>(i)])
                << dtype_name(t) << " world " << world << " n " << n << " rank " << r << " i " << i;
      }
}

TEST(InprocCommunicator, AllReduceIsReproducible) {
  // Random fp32 inputs whose sum depends on the order: every run gives the same bits.
  const int world = 4;
  const int64_t n = 1000;
  std::vector<float> first;
  for (int run = 0; run < 5; ++run) {
    InprocGroup group(world, 10s);
    std::vector<std::vector<float>> bufs;
    for (int r = 0; r < world; ++r) bufs.push_back(testing::random_floats(static_cast<size_t>(n), 17u + static_cast<uint32_t>(r), -1e3f, 1e3f));
    run_group(group, [&](int r, Communicator& c) {
      if (r == run % world) std::this_thread::sleep_for(2ms);  // vary who arrives last
      c.all_reduce_sum(bufs[static_cast<size_t>(r)].data(), n, DType::F32);
    });
    if (run == 0) first = bufs[0];
    for (int r = 0; r < world; ++r)
      ASSERT_EQ(std::memcmp(bufs[static_cast<size_t>(r)].data(), first.data(), static_cast<size_t>(n) * 4), 0);
  }
}

TEST(InprocCommunicator, AllGatherEveryDtypeWorldAndCount) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::I8, DType::U8, DType::I32})
    for (int world : {1, 2, 3, 4})
      for (int64_t n : kCounts) {
        for (bool in_place : {false, true}) {
          InprocGroup group(world, 10s);
          const size_t es = dtype_size(t), bytes = static_cast<size_t>(n) * es;
          std::vector<std::vector<uint8_t>> send(static_cast<size_t>(world)), recv(static_cast<size_t>(world));
          for (int r = 0; r < world; ++r) {
            send[static_cast<size_t>(r)].resize(bytes);
            for (size_t i = 0; i < bytes; ++i) send[static_cast<size_t>(r)][i] = static_cast<uint8_t>(r * 31 + i * 7);
            recv[static_cast<size_t>(r)].assign(bytes * static_cast<size_t>(world), 0xAB);
            if (in_place) std::memcpy(recv[static_cast<size_t>(r)].data() + static_cast<size_t>(r) * bytes, send[static_cast<size_t>(r)].data(), bytes);
          }
          run_group(group, [&](int r, Communicator& c) {
            uint8_t* out = recv[static_cast<size_t>(r)].data();
            const void* in = in_place ? out + static_cast<size_t>(r) * bytes : send[static_cast<size_t>(r)].data();
            c.all_gather(in, out, n, t);
          });
          for (int r = 0; r < world; ++r)
            for (int k = 0; k < world; ++k)
              ASSERT_EQ(std::memcmp(recv[static_cast<size_t>(r)].data() + static_cast<size_t>(k) * bytes, send[static_cast<size_t>(k)].data(), bytes), 0)
                  << dtype_name(t) << " world " << world << " n " << n << " rank " << r << " from " << k;
        }
      }
}

TEST(InprocCommunicator, BroadcastFromEveryRoot) {
  for (int world : {1, 2, 3, 4})
    for (int root = 0; root < world; ++root)
      for (int64_t n : kCounts) {
        InprocGroup group(world, 10s);
        std::vector<std::vector<int32_t>> bufs(static_cast<size_t>(world));
        for (int r = 0; r < world; ++r) bufs[static_cast<size_t>(r)].assign(static_cast<size_t>(n), r == root ? 0 : -1);
        for (int64_t i = 0; i < n; ++i) bufs[static_cast<size_t>(root)][static_cast<size_t>(i)] = static_cast<int32_t>(i * 3 + root);
        run_group(group, [&](int r, Communicator& c) { c.broadcast(bufs[static_cast<size_t>(r)].data(), n, DType::I32, root); });
        for (int r = 0; r < world; ++r) ASSERT_EQ(bufs[static_cast<size_t>(r)], bufs[static_cast<size_t>(root)]);
      }
}

TEST(InprocCommunicator, ManyCollectivesInARow) {
  // Back-to-back collectives of different kinds must not mix up their buffers.
  const int world = 3;
  InprocGroup group(world, 10s);
  run_group(group, [&](int r, Communicator& c) {
    for (int step = 0; step < 200; ++step) {
      float x = static_cast<float>(r + step);
      c.all_reduce_sum(&x, 1, DType::F32);
      EXPECT_EQ(x, static_cast<float>(3 * step + 3));
      int32_t b = r == step % world ? step : -1;
      c.broadcast(&b, 1, DType::I32, step % world);
      EXPECT_EQ(b, step);
      if (step % 7 == 0) c.barrier();
    }
  });
}

TEST(InprocCommunicator, ARankThatNeverArrivesTimesOut) {
  InprocGroup group(3, 200ms);
  std::vector<std::string> errors(3);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)  // rank 2 never calls
    threads.emplace_back([&, r] {
      float x = 1;
      try {
        group.rank(r).all_reduce_sum(&x, 1, DType::F32);
      } catch (const CommError& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    EXPECT_NE(errors[static_cast<size_t>(r)].find("rank(s) 2"), std::string::npos) << errors[static_cast<size_t>(r)];
    EXPECT_NE(errors[static_cast<size_t>(r)].find("all_reduce_sum"), std::string::npos) << errors[static_cast<size_t>(r)];
  }
  // The group stays failed: the late rank, and everyone after, gets the error at once.
  EXPECT_TRUE(group.failed());
  float x = 0;
  EXPECT_THROW(group.rank(2).all_reduce_sum(&x, 1, DType::F32), CommError);
  EXPECT_THROW(group.rank(0).barrier(), CommError);
}

TEST(InprocCommunicator, AbortWakesWaitingRanks) {
  InprocGroup group(2, 60s);
  std::string error;
  std::thread waiter([&] {
    try {
      group.rank(0).barrier();
    } catch (const CommError& e) {
      error = e.what();
    }
  });
  std::this_thread::sleep_for(20ms);
  group.abort("rank 1 died");
  waiter.join();
  EXPECT_EQ(error, "rank 1 died");
}

TEST(InprocCommunicator, RejectsAnEmptyGroup) { EXPECT_THROW(InprocGroup(0, 1s), Error); }

// ---- NCCL ------------------------------------------------------------------------------------------

#ifdef FINESERVE_HAVE_CUDA
TEST(NcclCommunicator, WorldOfOneOnTheGpu) {
  ASSERT_TRUE(nccl_built());
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  NcclOptions o;
  o.unique_id = nccl_unique_id();
  o.timeout = 30s;
  auto comm = make_nccl_communicator(o);
  EXPECT_EQ(comm->world(), 1);
  EXPECT_EQ(comm->name(), "nccl");
  const int64_t n = 769;
  std::vector<float> host(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) host[static_cast<size_t>(i)] = value(0, i);
  void *d = nullptr, *g = nullptr;
  ASSERT_EQ(cudaMalloc(&d, static_cast<size_t>(n) * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&g, static_cast<size_t>(n) * 4), cudaSuccess);
  cudaMemcpy(d, host.data(), static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice);
  comm->all_reduce_sum(d, n, DType::F32);
  comm->broadcast(d, n, DType::F32, 0);
  comm->all_gather(d, g, n, DType::F32);
  comm->barrier();
  std::vector<float> back(static_cast<size_t>(n));
  cudaMemcpy(back.data(), g, static_cast<size_t>(n) * 4, cudaMemcpyDeviceToHost);
  EXPECT_EQ(back, host);
  cudaFree(d);
  cudaFree(g);
}

TEST(NcclCommunicator, JoiningAGroupWhoseOtherRanksNeverComeTimesOut) {
  if (!cuda::device_available()) GTEST_SKIP() << "no CUDA device";
  NcclOptions o;
  o.unique_id = nccl_unique_id();
  o.world = 2;  // rank 1 never joins
  o.timeout = 2s;
  EXPECT_THROW(make_nccl_communicator(o), CommError);
}
#else
TEST(NcclCommunicator, ABuildWithoutCudaSaysSo) {
  EXPECT_FALSE(nccl_built());
  try {
    nccl_unique_id();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
}
#endif

}  // namespace
}  // namespace fineserve
