// parallel_items: spread n independent work items over torch's threads.
//
// Work distribution. at::parallel_for cannot be used here: with torch's OpenMP
// backend it is a header-only `#pragma omp parallel`, which this extension
// (built without -fopenmp, so as not to load a second OpenMP runtime) compiles
// as a plain serial loop. Instead the caller and up to get_num_threads() - 1
// helpers from torch's inter-op pool (at::launch) pull work items from one
// atomic counter. The caller drains the queue itself if no helper ever starts,
// so it never waits on a queued task, only on helpers already running items.
// Each item is computed the same way whoever runs it, so results do not
// depend on the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>

#include <ATen/Parallel.h>

namespace drople_fast {

// Hands out item indices in [0, n); -1 when none are left.
class ItemSource {
 public:
  ItemSource(std::atomic<int64_t>* next, int64_t n) : next_(next), n_(n) {}
  int64_t operator()() {
    const int64_t i = next_->fetch_add(1, std::memory_order_relaxed);
    return i < n_ ? i : -1;
  }

 private:
  std::atomic<int64_t>* next_;
  int64_t n_;
};

struct ItemQueue {
  std::atomic<int64_t> next{0};
  int64_t n = 0;
  std::mutex mu;
  std::condition_variable cv;
  bool closed = false;  // the caller has drained the queue: late helpers must not start
  int active = 0;       // helpers inside `participant`
  std::exception_ptr error;
};

// Runs participant(items) on the calling thread and on up to
// min(at::get_num_threads(), n) - 1 pool threads; every participant pulls
// item indices from `items` until it returns -1. Each participant typically
// sets up its own scratch once, then loops over the items it gets.
template <typename Participant>
void parallel_items(int64_t n, const Participant& participant) {
  if (n <= 0) return;
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1) {
    std::atomic<int64_t> next{0};
    ItemSource items(&next, n);
    participant(items);
    return;
  }
  auto queue = std::make_shared<ItemQueue>();
  queue->n = n;
  for (int64_t t = 1; t < threads; ++t) {
    at::launch([queue, &participant] {
      {
        std::lock_guard<std::mutex> lock(queue->mu);
        if (queue->closed) return;  // the caller is done (and `participant` may be gone)
        ++queue->active;
      }
      try {
        ItemSource items(&queue->next, queue->n);
        participant(items);
      } catch (...) {
        std::lock_guard<std::mutex> lock(queue->mu);
        if (!queue->error) queue->error = std::current_exception();
        queue->next.store(queue->n);  // stop handing out items
      }
      std::lock_guard<std::mutex> lock(queue->mu);
      if (--queue->active == 0) queue->cv.notify_all();
    });
  }
  std::exception_ptr caller_error;
  try {
    ItemSource items(&queue->next, n);
    participant(items);
  } catch (...) {
    caller_error = std::current_exception();
    queue->next.store(n);
  }
  std::unique_lock<std::mutex> lock(queue->mu);
  queue->closed = true;
  queue->cv.wait(lock, [&] { return queue->active == 0; });
  if (caller_error) std::rethrow_exception(caller_error);
  if (queue->error) std::rethrow_exception(queue->error);
}

}  // namespace drople_fast
