// Work split between the calling thread and XLA's intra-op thread pool, for the CPU kernels
// (cpu_matmul.cc, cpu_attention.cc). A second pool would fight XLA's threads for the same cores
// between products, so helpers are scheduled on XLA's own: items [0, count) are cut into
// ranges that the caller and the helpers claim; a helper that starts late finds every range
// claimed and returns at once, and the caller waits only for ranges in progress. Which thread
// runs an item never changes its result: each item's arithmetic is fixed by the item alone.

#ifndef JAXSPEC_CPU_THREADS_H_
#define JAXSPEC_CPU_THREADS_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace jaxspec {

// At most this many threads (the caller's included) share one call; set from Python
// (jaxspec_small_m_set_threads).
inline int max_threads = 8;

// Threads a call may use on `pool`.
inline int64_t usable_threads(xla::ffi::ThreadPool& pool) {
  return std::min<int64_t>(pool.num_threads() + 1, max_threads);
}

// run(begin, end) over [0, count) in `threads` ranges (threads <= 1: one call on this thread).
inline void parallel_ranges(xla::ffi::ThreadPool& pool, int64_t count, int64_t threads,
                            std::function<void(int64_t, int64_t)> run) {
  if (threads <= 1 || count <= 1) return run(0, count);
  struct Shared {
    std::function<void(int64_t, int64_t)> run;
    int64_t count, per_range, ranges;
    std::atomic<int64_t> next{0}, finished{0};
    void claim_all() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < ranges;) {
        run(i * per_range, std::min((i + 1) * per_range, count));
        finished.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->run = std::move(run);
  shared->count = count;
  shared->per_range = (count + threads - 1) / threads;
  shared->ranges = (count + shared->per_range - 1) / shared->per_range;
  for (int64_t i = 1; i < shared->ranges; ++i) pool.Schedule([shared] { shared->claim_all(); });
  shared->claim_all();
  while (shared->finished.load(std::memory_order_acquire) < shared->ranges) _mm_pause();
}

}  // namespace jaxspec

#endif  // JAXSPEC_CPU_THREADS_H_
