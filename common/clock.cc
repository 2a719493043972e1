#include "common/clock.h"

#include <time.h>

#include <limits>

namespace shimlet {

int64_t monotonic_ms() noexcept { return monotonic_ns() / 1000000; }

int64_t monotonic_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

int Deadline::left_ms() const noexcept {
  int64_t left = end_ms_ - monotonic_ms();
  if (left <= 0) return 0;
  return left > std::numeric_limits<int>::max() ? std::numeric_limits<int>::max() : static_cast<int>(left);
}

}  // namespace shimlet
