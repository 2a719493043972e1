// Hands closures from other threads to a libevent loop: post() from any
// thread, they run on the loop thread in order. An eventfd wakes the loop
// (libevent's own cross-thread event_active needs evthread locking, which the
// rest of the master does not use). The etcd registry's completions come
// through here, so its state is only ever touched on the loop.
#pragma once
#include <deque>
#include <functional>
#include <mutex>

#include "common/event.h"
#include "common/fd.h"

namespace shimlet::master {

class LoopPost {
 public:
  explicit LoopPost(event_base* base);  // throws on eventfd/event failure
  ~LoopPost() = default;                // closures not run yet are dropped
  LoopPost(const LoopPost&) = delete;
  LoopPost& operator=(const LoopPost&) = delete;

  void post(std::function<void()> fn);

 private:
  static void on_wake(int fd, short, void* arg);
  Fd efd_;
  EventPtr ev_;
  std::mutex mu_;
  std::deque<std::function<void()>> queue_;
};

}  // namespace shimlet::master
