// A persistent pool of worker threads: parallel regions cost a wake-up, not a thread creation.
// Workers spin briefly before sleeping because a decode step runs hundreds of short regions.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ffnskip::cpu {

class ThreadPool {
 public:
  // `num_threads` counts the calling thread; 0 means all hardware threads.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Splits [0, n) into size() contiguous chunks and runs fn(begin, end, chunk_index) on them,
  // chunk 0 on the calling thread. Returns when every chunk is done.
  using Task = std::function<void(int64_t, int64_t, int)>;
  void parallel_for(int64_t n, const Task& fn);

 private:
  void worker_loop(int index);
  void run_chunk(int index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  const Task* task_ = nullptr;
  int64_t task_n_ = 0;
};

}  // namespace ffnskip::cpu
