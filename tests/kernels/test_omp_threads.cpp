// cpu::run_on_short_lived_thread: runs its function on another thread, waits, and passes on what it
// threw; an OpenMP region inside it runs there (its pool ends with that thread).
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

#include "kernels/cpu/omp_threads.h"

namespace fineserve {
namespace {

TEST(RunOnShortLivedThread, RunsOnAnotherThreadAndWaitsForIt) {
  std::thread::id ran_on, region_master;
  cpu::run_on_short_lived_thread([&] {
    ran_on = std::this_thread::get_id();
#pragma omp parallel num_threads(2)
    {
#pragma omp master
      region_master = std::this_thread::get_id();
    }
  });
  EXPECT_NE(ran_on, std::thread::id());
  EXPECT_NE(ran_on, std::this_thread::get_id());
  EXPECT_EQ(region_master, ran_on) << "the OpenMP region must run on (and be owned by) the short-lived thread";
}

TEST(RunOnShortLivedThread, PassesOnWhatTheFunctionThrew) {
  EXPECT_THROW(cpu::run_on_short_lived_thread([] { throw std::runtime_error("load failed"); }), std::runtime_error);
  try {
    cpu::run_on_short_lived_thread([] { throw std::runtime_error("load failed"); });
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "load failed");
  }
}

}  // namespace
}  // namespace fineserve
