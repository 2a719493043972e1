#include "ticket/replay.h"

namespace shimlet::ticket {

ReplayCache::Result ReplayCache::consume(const std::array<uint8_t, 32>& digest, int64_t exp, int64_t now) {
  // Forget tickets that can no longer be used anyway: they make room.
  while (!by_exp_.empty() && by_exp_.begin()->first < now) {
    by_digest_.erase(by_exp_.begin()->second);
    by_exp_.erase(by_exp_.begin());
  }
  if (by_digest_.count(digest)) return Result::Replayed;
  // A ticket already past its window would be evicted at once and so could be
  // "accepted" again and again; verify() refuses it before this, but never
  // accept it here either.
  if (exp < now) return Result::Replayed;
  // Full of unexpired entries: refuse (fail closed) rather than forget one.
  if (by_digest_.size() >= capacity_) return Result::Full;
  by_digest_.emplace(digest, exp);
  by_exp_.emplace(exp, digest);
  return Result::Accepted;
}

}  // namespace shimlet::ticket
