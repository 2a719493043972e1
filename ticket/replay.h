// Bounded single-use cache of ticket ids, kept by the shim across sessions.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <utility>

namespace shimlet::ticket {

class ReplayCache {
 public:
  enum class Result { Accepted, Replayed, Full };
  explicit ReplayCache(size_t capacity = 4096) : capacity_(capacity) {}
  // digest: SHA-256 of the jti. exp: the last second the ticket is still
  // accepted (unix s): its exp claim PLUS the clock leeway, otherwise a replay
  // inside the leeway would find the entry already evicted. now: current time.
  // Expired entries (exp < now) are evicted first; a digest already present is
  // Replayed; when the cache is full of unexpired entries: Full (refuse).
  Result consume(const std::array<uint8_t, 32>& digest, int64_t exp, int64_t now);
  size_t size() const { return by_digest_.size(); }

 private:
  size_t capacity_;
  std::map<std::array<uint8_t, 32>, int64_t> by_digest_;
  std::set<std::pair<int64_t, std::array<uint8_t, 32>>> by_exp_;
};

}  // namespace shimlet::ticket
