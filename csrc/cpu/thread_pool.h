// A persistent pool of worker threads: parallel regions cost a wake-up, not a thread creation.
// Workers spin briefly before sleeping because a decode step runs hundreds of short regions.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ffnskip::cpu {

class ThreadPool {
 public:
  // `num_threads` counts the calling thread; 0 means all hardware threads. Throws
  // std::runtime_error when the threads cannot be started (memory or process limits), with
  // none left running.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_workers_ + 1; }

  // Splits [0, n) into size() contiguous chunks and runs fn(begin, end, chunk_index) on them,
  // chunk 0 on the calling thread. Returns when every chunk is done. In a process forked
  // after the pool started (its workers exist only in the parent), starts new workers first.
  using Task = std::function<void(int64_t, int64_t, int)>;
  void parallel_for(int64_t n, const Task& fn);

  // Runs fn(begin, end) on pieces [begin, begin + grain) of [0, n) that the threads take in
  // turn as they finish the last: for loops whose speed differs between threads (streams from
  // memory on cores that share its bandwidth), so that none waits long for the others.
  using RangeTask = std::function<void(int64_t, int64_t)>;
  void parallel_for_dynamic(int64_t n, int64_t grain, const RangeTask& fn);

 private:
  struct Workers;  // the threads and what they share with the caller

  std::unique_ptr<Workers> start_workers() const;
  bool forked_since_start() const;

  int num_workers_ = 0;
  std::unique_ptr<Workers> workers_;  // null when size() == 1
  uint64_t fork_count_at_start_ = 0;
};

}  // namespace ffnskip::cpu
