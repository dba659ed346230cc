#include "thread_pool.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FFNSKIP_CPU_RELAX() _mm_pause()
#else
#define FFNSKIP_CPU_RELAX() ((void)0)
#endif

namespace ffnskip::cpu {

namespace {
// A few hundred microseconds of spinning (pause is ~40-140 cycles) before a worker sleeps.
constexpr int kSpinIterations = 5000;
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  int total = num_threads > 0 ? num_threads
                              : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < total; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::run_chunk(int index) {
  const int64_t parts = size();
  const int64_t begin = task_n_ * index / parts;
  const int64_t end = task_n_ * (index + 1) / parts;
  if (begin < end) (*task_)(begin, end, index);
}

void ThreadPool::parallel_for(int64_t n, const Task& fn) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    fn(0, n, 0);
    return;
  }
  task_ = &fn;
  task_n_ = n;
  pending_.store(static_cast<int>(workers_.size()));
  generation_.fetch_add(1);  // publishes task_ to spinning workers (seq_cst)
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }
  run_chunk(0);
  while (pending_.load() != 0) FFNSKIP_CPU_RELAX();
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    int spins = 0;
    while (generation_.load() == seen && spins < kSpinIterations) {
      FFNSKIP_CPU_RELAX();
      ++spins;
    }
    if (generation_.load() == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
      sleepers_.fetch_sub(1);
    }
    seen = generation_.load();
    if (stop_.load()) return;
    run_chunk(index);
    pending_.fetch_sub(1);
  }
}

}  // namespace ffnskip::cpu
