// Keeping one OpenMP thread pool per process: where setup work (loading, packing, writing a
// synthetic checkpoint) runs on another thread than the one that will run the model.
//
// libgomp keeps a pool of worker threads for every thread that ever opened a parallel region. A
// process that packs weights on its main thread and then decodes on an engine thread has two pools;
// once libgomp manages more threads than there are CPUs it cuts its spin-wait to ~100 iterations,
// so every parallel region of a decode step (about 210 per token for SmolLM2-135M) puts its workers
// to sleep and wakes them through the kernel. Measured on 2 cores: a 256-token stream took 3.0-3.3 s
// with the loader's pool alive, 1.9-2.3 s without. A pool goes away with the thread that owns it.
#pragma once

#include <exception>
#include <thread>
#include <utility>

namespace fineserve::cpu {

// Runs fn on a thread of its own and waits for it (rethrowing what it threw), so that any OpenMP
// pool it creates ends with it.
template <class F>
void run_on_short_lived_thread(F&& fn) {
  std::exception_ptr failure;
  std::thread worker([&] {
    try {
      std::forward<F>(fn)();
    } catch (...) {
      failure = std::current_exception();
    }
  });
  worker.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace fineserve::cpu
