// Monotonic time (CLOCK_MONOTONIC: never jumps with the wall clock) for
// timeouts and durations.
#pragma once
#include <cstdint>

namespace shimlet {

int64_t monotonic_ms() noexcept;
int64_t monotonic_ns() noexcept;  // finer than a millisecond: recordings, latency histograms

// A point timeout_ms from now; left_ms() is what poll(2) and friends get.
class Deadline {
 public:
  explicit Deadline(int64_t timeout_ms) noexcept : end_ms_(monotonic_ms() + timeout_ms) {}
  // Milliseconds until the deadline, 0 once it has passed (fits poll's int).
  int left_ms() const noexcept;
  bool passed() const noexcept { return left_ms() == 0; }

 private:
  int64_t end_ms_;
};

}  // namespace shimlet
