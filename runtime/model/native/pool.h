// A small pool of threads that sleep on a condition variable between calls (no spinning:
// an idle stage must not take the cores a neighbouring stage computes on).
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace layerline {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // Runs task(0) .. task(parts - 1), part 0 on the calling thread, and returns when all are done.
  void run(int parts, const std::function<void(int)>& task);

 private:
  void work(int index);

  std::vector<std::thread> workers_;
  std::mutex call_;  // one call at a time (mlx may evaluate on several streams)
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int parts_ = 0, pending_ = 0;
  unsigned generation_ = 0;
  bool stop_ = false;
};

// The process's pool: LAYERLINE_KERNEL_THREADS threads, else one per CPU this process may use.
ThreadPool& kernel_pool();

}  // namespace layerline
