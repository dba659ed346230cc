#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <system_error>

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

// Forks seen by this process (incremented in the child): a pool started before the last fork
// has no workers in this process, only their copied state (possibly a locked mutex).
std::atomic<uint64_t> fork_count{0};

void count_fork_in_child() { fork_count.fetch_add(1, std::memory_order_relaxed); }

uint64_t current_fork_count() {
  static const int registered = pthread_atfork(nullptr, nullptr, count_fork_in_child);
  (void)registered;
  return fork_count.load(std::memory_order_relaxed);
}
}  // namespace

struct ThreadPool::Workers {
  std::vector<std::thread> threads;
  int parts = 1;  // threads + the caller
  std::mutex mutex;
  std::condition_variable wake;
  std::atomic<uint64_t> generation{0};
  std::atomic<int> pending{0};
  std::atomic<int> sleepers{0};
  std::atomic<bool> stop{false};
  const Task* task = nullptr;
  int64_t task_n = 0;

  void run_chunk(int index) {
    const int64_t begin = task_n * index / parts;
    const int64_t end = task_n * (index + 1) / parts;
    if (begin < end) (*task)(begin, end, index);
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      int spins = 0;
      while (generation.load() == seen && spins < kSpinIterations) {
        FFNSKIP_CPU_RELAX();
        ++spins;
      }
      if (generation.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex);
        sleepers.fetch_add(1);
        wake.wait(lock, [&] { return generation.load() != seen; });
        sleepers.fetch_sub(1);
      }
      seen = generation.load();
      if (stop.load()) return;
      run_chunk(index);
      pending.fetch_sub(1);
    }
  }

  void stop_and_join() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
      generation.fetch_add(1);
    }
    wake.notify_all();
    for (auto& t : threads) t.join();
    threads.clear();
  }
};

ThreadPool::ThreadPool(int num_threads) {
  const int total = num_threads > 0
                        ? num_threads
                        : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  num_workers_ = total - 1;
  fork_count_at_start_ = current_fork_count();
  workers_ = start_workers();
}

std::unique_ptr<ThreadPool::Workers> ThreadPool::start_workers() const {
  if (num_workers_ == 0) return nullptr;
  auto workers = std::make_unique<Workers>();
  workers->parts = num_workers_ + 1;
  workers->threads.reserve(static_cast<size_t>(num_workers_));
  Workers* shared = workers.get();
  try {
    for (int i = 1; i <= num_workers_; ++i) {
      workers->threads.emplace_back([shared, i] { shared->loop(i); });
    }
  } catch (const std::system_error& e) {
    const size_t started = workers->threads.size();
    workers->stop_and_join();
    throw std::runtime_error("cannot start " + std::to_string(num_workers_) +
                             " worker threads (started " + std::to_string(started) + "): " +
                             e.what() + "; a smaller num_threads may fit the process limits");
  }
  return workers;
}

bool ThreadPool::forked_since_start() const {
  return current_fork_count() != fork_count_at_start_;
}

ThreadPool::~ThreadPool() {
  if (!workers_) return;
  if (forked_since_start()) {
    // The threads belong to the parent: joining them here would wait forever, and their
    // mutex may be held by one of them. Leave the copied state as it is.
    (void)workers_.release();
    return;
  }
  workers_->stop_and_join();
}

void ThreadPool::parallel_for(int64_t n, const Task& fn) {
  if (n <= 0) return;
  if (!workers_ || n == 1) {
    fn(0, n, 0);
    return;
  }
  if (forked_since_start()) {
    (void)workers_.release();  // the parent's threads, see ~ThreadPool
    fork_count_at_start_ = current_fork_count();
    workers_ = start_workers();
  }
  Workers& w = *workers_;
  w.task = &fn;
  w.task_n = n;
  w.pending.store(num_workers_);
  w.generation.fetch_add(1);  // publishes task to spinning workers (seq_cst)
  if (w.sleepers.load() > 0) {
    std::lock_guard<std::mutex> lock(w.mutex);
    w.wake.notify_all();
  }
  w.run_chunk(0);
  while (w.pending.load() != 0) FFNSKIP_CPU_RELAX();
}

void ThreadPool::parallel_for_dynamic(int64_t n, int64_t grain, const RangeTask& fn) {
  grain = std::max<int64_t>(grain, 1);
  std::atomic<int64_t> next{0};
  parallel_for(std::min<int64_t>(size(), (n + grain - 1) / grain), [&](int64_t, int64_t, int) {
    for (int64_t begin; (begin = next.fetch_add(grain)) < n;) fn(begin, std::min(n, begin + grain));
  });
}

}  // namespace ffnskip::cpu
