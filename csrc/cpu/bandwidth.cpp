#include "bandwidth.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <vector>

#include "simd.h"
#include "thread_pool.h"

namespace ffnskip::cpu {

namespace {

// Four independent accumulators so the adds never wait on each other: loads set the pace.
template <Isa I>
__attribute__((always_inline)) inline float sum_kernel(const float* p, int64_t len) {
  using V = vfloat<I>;
  constexpr int L = kLanes<I>;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 4 * L <= len; i += 4 * L) {
    a0 += load<V>(p + i);
    a1 += load<V>(p + i + L);
    a2 += load<V>(p + i + 2 * L);
    a3 += load<V>(p + i + 3 * L);
  }
  float s = reduce_add((a0 + a1) + (a2 + a3));
  for (; i < len; ++i) s += p[i];
  return s;
}

FFNSKIP_ISA_VARIANTS(float, sum_kernel, (const float* p, int64_t len), (p, len))

}  // namespace

double measure_read_bandwidth(int64_t bytes, int num_threads, int repeats) {
  constexpr int64_t kMinBytes = int64_t{64} << 20;  // well past any last-level cache we target
  if (bytes < kMinBytes) throw std::invalid_argument("bandwidth buffer must be >= 64 MiB");
  if (repeats < 1) throw std::invalid_argument("repeats must be >= 1");
  if (num_threads < 0) throw std::invalid_argument("num_threads must be >= 0");
  const auto sum = sum_kernel_for_isa(kernel_isa());
  const int64_t n = bytes / static_cast<int64_t>(sizeof(float));
  const std::unique_ptr<float[]> buffer(new float[n]);
  ThreadPool pool(num_threads);
  // Each thread writes the part it will read (first touch places pages near it).
  pool.parallel_for(n, [&](int64_t begin, int64_t end, int) {
    std::fill(buffer.get() + begin, buffer.get() + end, 1.0f);
  });
  std::vector<float> partial(static_cast<size_t>(pool.size()));
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    pool.parallel_for(n, [&](int64_t begin, int64_t end, int chunk) {
      partial[chunk] = sum(buffer.get() + begin, end - begin);
    });
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    best = std::max(best, static_cast<double>(n * sizeof(float)) / seconds.count());
  }
  // The sums are used, so the reads cannot be optimised away; every element is 1.
  float total = 0.0f;
  for (const float s : partial) total += s;
  if (!(total > 0.0f)) throw std::logic_error("bandwidth probe read wrong data");
  return best;
}

}  // namespace ffnskip::cpu
