// The pre-authentication gate's table of unauthenticated connections
// (docs/design.md "Pre-authentication gate"): a pure data structure that
// decides which connection must go so that another fits, and when one has
// used up its time. No sockets, no clock of its own (the caller passes `now`
// in milliseconds of a monotonic clock); unit-tested in tests/unit/preauth_test.cc.
//
// Bounds, each enforced when a connection is added or grows:
//   * max_total connections and max_per_source from one source (an IPv4
//     address, or the /64 of an IPv6 one: what one attacker trivially owns),
//   * max_memory bytes in all, each connection accounted at what its state
//     costs (set by the caller: a bare socket, a TLS handshake, a parsed
//     request head) plus its buffered plaintext,
//   * timeout_ms from accept to a valid ticket (expired()).
// Who goes when a bound is hit: the idlest connection first, i.e. the one
// whose last progress (bytes from the peer) is oldest; of its source when the
// per-source bound is hit. sshd's MaxStartups drops *new* connections at
// random; that lets a flood of idle connections refuse legitimate ones.
// Dropping the idlest instead never drops a connection that is making
// progress while idler ones exist: a legitimate client completes its
// handshake and request within a few round trips, so it is never the
// idlest for long, while idle connections (bare TCP, a handshake that
// stalls, a slowloris a byte per second) are. A new connection itself is
// never refused: it starts as the freshest.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace shimlet::session {

class PreauthTable {
 public:
  struct Limits {
    size_t max_total = 4096;
    size_t max_per_source = 2048;
    size_t max_memory = 32u << 20;
    int64_t timeout_ms = 5000;
  };
  using Id = uint64_t;
  enum class Why { Total, PerSource, Memory };
  struct Victim {
    Id id;
    Why why;
  };

  explicit PreauthTable(Limits limits) : limits_(limits) {}

  // A connection accepted at `now` from `source` (source_key()) that costs
  // `cost` bytes. Returns the connections to drop now (already removed from
  // the table), idlest first, so that the bounds hold with it. ids are
  // unique, at least 1, and never reused by the caller.
  std::vector<Victim> add(Id id, const std::string& source, int64_t now, size_t cost);
  // Bytes arrived from the peer: its last progress is now.
  void progress(Id id, int64_t now);
  // Its cost changed (a TLS object, a parser, buffered bytes): the
  // connections to drop for the memory bound (never `id` itself).
  std::vector<Victim> set_cost(Id id, size_t cost);
  void remove(Id id);
  bool contains(Id id) const { return conns_.count(id) != 0; }

  // Connections whose deadline (accept + timeout_ms) is at or before now.
  std::vector<Id> expired(int64_t now) const;
  // The earliest deadline, if any connection is held.
  std::optional<int64_t> next_deadline() const;

  // The connection to give up first when something else must fit (an fd,
  // say): the idlest.
  std::optional<Id> idlest() const { return idlest(nullptr, 0); }

  size_t size() const { return conns_.size(); }
  size_t count(const std::string& source) const;
  size_t memory() const { return memory_; }
  const Limits& limits() const { return limits_; }

  // The source a peer address counts against: "4:a.b.c.d" for IPv4 (and
  // IPv4-mapped IPv6), "6:" + the first 8 bytes for IPv6, "" for others.
  // family/addr as in sockaddr (AF_INET: 4 bytes, AF_INET6: 16 bytes).
  static std::string source_key(int family, const uint8_t* addr);

 private:
  struct Conn {
    std::string source;
    int64_t accepted = 0, last = 0;
    size_t cost = 0;
  };
  using Key = std::pair<int64_t, Id>;  // (time, id): ordered sets
  void drop(Id id, Why why, std::vector<Victim>& out);
  std::optional<Id> idlest(const std::string* source, Id spare) const;

  Limits limits_;
  std::map<Id, Conn> conns_;
  std::set<Key> by_accept_;                         // deadlines
  std::set<Key> by_last_;                           // idlest first
  std::map<std::string, std::set<Key>> by_source_;  // per source, idlest first
  size_t memory_ = 0;
};

}  // namespace shimlet::session
