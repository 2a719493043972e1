// A session's end report to the shim (docs/design.md "Session results and
// bytes"): the last datagram a session sends on its own control socket (fd 4:
// the local socket's session's, or the one the shim gave a TCP session with
// the gate's 'A', shim/gate_proto.h), right before it exits. Sent as the raw
// struct (same binary on both ends). Header only and dependency-free: the
// static shim includes it.
#pragma once
#include <cstddef>
#include <cstdint>

namespace shimlet::session_end {

// How a session ended. A session that sends no report (killed, crashed,
// failed before it had a connection to serve) is counted as Error.
enum class Result : uint8_t {
  Ok,           // a ticket accepted; its exec exited 0, or its forward ended normally
  ExitNonzero,  // a ticket accepted; its exec's command exited non-zero or was killed by a signal
  Refused,      // no ticket accepted on the connection (every request refused, or none made)
  Error,        // a ticket accepted but the session ended abnormally (no report, the command did not
                // start, a limit, a refused recording, the client gone, terminated)
};
inline constexpr const char* kResultNames[] = {"ok", "exit_nonzero", "refused", "error"};
inline constexpr size_t kNumResults = sizeof kResultNames / sizeof kResultNames[0];

inline constexpr char kTag = 'E';
struct Report {
  char tag = kTag;
  uint8_t result = 0;  // Result
  uint8_t pad[6] = {};
  uint64_t bytes_in = 0;   // client -> container: the session end record's bytes_in
  uint64_t bytes_out = 0;  // container -> client: its bytes_out
};
// Not the size of any other message on the socket (replay request 40, warm ready 1).
static_assert(sizeof(Report) == 24);

}  // namespace shimlet::session_end
