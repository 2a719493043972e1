#include "master/loop_post.h"

#include <event2/event.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>

#include "common/error.h"
#include "common/log.h"

namespace shimlet::master {

LoopPost::LoopPost(event_base* base) : efd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (!efd_) throw sys_error("eventfd");
  ev_ = new_event(base, efd_.get(), EV_READ | EV_PERSIST, on_wake, this);
  if (event_add(ev_.get(), nullptr) != 0) throw Error("cannot add the loop's wake-up event");
}

void LoopPost::post(std::function<void()> fn) {
  {
    std::lock_guard lk(mu_);
    queue_.push_back(std::move(fn));
  }
  uint64_t one = 1;
  // EAGAIN only when the counter is near its maximum: the loop is awake anyway.
  [[maybe_unused]] ssize_t n = ::write(efd_.get(), &one, sizeof one);
}

void LoopPost::on_wake(int fd, short, void* arg) {
  auto* self = static_cast<LoopPost*>(arg);
  uint64_t v;
  [[maybe_unused]] ssize_t n = ::read(fd, &v, sizeof v);
  std::deque<std::function<void()>> batch;
  {
    std::lock_guard lk(self->mu_);
    batch.swap(self->queue_);
  }
  for (auto& fn : batch) {
    try {
      fn();
    } catch (const std::exception& e) {
      log::error("a posted completion failed", {{"error", e.what()}});
    }
  }
}

}  // namespace shimlet::master
