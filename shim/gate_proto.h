// The control protocol between the shim and its pre-authentication gate
// (docs/design.md "Pre-authentication gate"), and the gate's counters. Header
// only and dependency-free: the static shim includes it.
//
// One SOCK_SEQPACKET pair per gate lineage (the gate process and the gates
// it forks, each taking over when the previous one became a session):
//   gate -> shim 'S' + SHA-256(jti) (32) + expiry (int64 LE, unix seconds):
//        a connection presented a valid ticket; consume its jti and reserve
//        an authenticated session. Reply, one byte: 'A' accepted (the sender
//        is that session from now on; a forked child takes over as gate),
//        with SCM_RIGHTS: a SOCK_SEQPACKET socket, the session's own control
//        socket (its end report, shim/session_proto.h; the gate closes its
//        copy), 'R' ticket replayed, 'F' replay cache full (or no socket for
//        the session), 'L' max_sessions reached.
//   gate -> shim 'U' + pid (int32 LE): the fork after an 'A' failed; that
//        process stays the gate and the slot is free again.
//   gate -> shim 'G' + pid (int32 LE), SCM_RIGHTS: a pidfd of the sender:
//        "I am the gate now" (the child forked after an 'A').
//   gate -> shim 'T' + GateCounters: the lineage's cumulative counters
//        (at most once a second while they change, and before it exits).
// The socket's hang-up tells the shim the lineage is over (idle exit, crash):
// it then accepts on the TCP port itself again, starting a gate at the next
// connection.
#pragma once
#include <cstddef>
#include <cstdint>

namespace shimlet::gate {

inline constexpr char kAdmit = 'S', kUnreserve = 'U', kTakeOver = 'G', kCounters = 'T';
inline constexpr char kAccepted = 'A', kReplayed = 'R', kCacheFull = 'F', kLimit = 'L';
inline constexpr size_t kAdmitSize = 1 + 32 + 8;

// What happened to unauthenticated TCP connections, cumulative. Sent as the
// raw struct (same binary on both ends). Also the "preauth" object of
// STATE/<id>/stats.json, under these names.
struct GateCounters {
  uint64_t accepted = 0;            // TCP connections taken by the gate
  uint64_t admitted = 0;            // valid ticket, session forked
  uint64_t refused_request = 0;     // answered with an error status (bad/no ticket, bad request, replay)
  uint64_t refused_protocol = 0;    // TLS handshake failure, malformed HTTP/2 or HTTP/1.1 head
  uint64_t timed_out = 0;           // no valid ticket within preauth_timeout_ms
  uint64_t dropped_total = 0;       // dropped for preauth_max_connections
  uint64_t dropped_per_source = 0;  // dropped for preauth_max_per_source
  uint64_t dropped_memory = 0;      // dropped for preauth_max_memory
  uint64_t refused_sessions = 0;    // valid ticket, but max_sessions authenticated sessions run
  uint64_t peer_closed = 0;         // the peer hung up before presenting a ticket
  uint64_t open = 0;                // gauge: unauthenticated connections held now
  uint64_t open_peak = 0;           // gauge: the most held at once
  uint64_t cri_accepted = 0;        // of accepted: from the CRI listener (plain HTTP/1.1)
};
inline constexpr const char* kCounterNames[] = {
    "accepted",      "admitted",           "refused_request", "refused_protocol", "timed_out",
    "dropped_total", "dropped_per_source", "dropped_memory",  "refused_sessions", "peer_closed",
    "open",          "open_peak",          "cri_accepted"};
inline constexpr size_t kNumCounters = sizeof(GateCounters) / sizeof(uint64_t);
static_assert(sizeof kCounterNames / sizeof kCounterNames[0] == kNumCounters);

}  // namespace shimlet::gate
