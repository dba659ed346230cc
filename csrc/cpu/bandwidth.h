// The machine's memory read bandwidth as our kernels see it: the thread pool's threads each
// stream their share of a buffer far larger than the caches through the same vector loads the
// GEMVs use. Benchmarks report decode GB/s as a fraction of this.
#pragma once

#include <cstdint>

namespace ffnskip::cpu {

// Best bytes/s over `repeats` passes of `num_threads` threads (0: all hardware threads) summing
// a `bytes` buffer. Throws std::invalid_argument unless bytes >= 64 MiB, repeats >= 1 and
// num_threads >= 0.
double measure_read_bandwidth(int64_t bytes, int num_threads, int repeats);

}  // namespace ffnskip::cpu
