// Seam between the Kubernetes HTTP/1.1 front door (session_k8s.cc, helper
// "ws") and the SPDY/3.1 side (session_spdy.cc, helper "spdy").
//
// The front door parses the one HTTP/1.1 request, authenticates the ticket
// (signature, aud, verb, lifetime, cnf; jti consumed) and checks exec claims
// (query command/stdin/tty == ticket), picks the protocol, then calls
// start_spdy() when the protocol is SPDY:
//   * `Upgrade: SPDY/3.1` with X-Stream-Protocol-Version v4..v2.channel.k8s.io,
//     channel.k8s.io (exec) or portforward.k8s.io (port-forward): the raw TLS
//     byte stream after the 101 is the SPDY stream;
//   * WebSocket with subprotocol SPDY/3.1+portforward.k8s.io: the SPDY bytes
//     travel in WebSocket binary messages (boundaries meaningless); the front
//     door does the WebSocket framing, pings and close.
// start_spdy() is called BEFORE the 101 goes out: returning nullptr makes the
// front door answer 501 instead (the stub does that). Bytes the endpoint
// sends from inside start_spdy() are queued and written right after the 101.
// Bytes the client sent after its request headers arrive via on_bytes().
//
// Callbacks never re-enter: the front door does not call the endpoint from
// inside SpdyTransport methods. After on_transport_closed() or after the
// endpoint called close(), the front door destroys the endpoint (at a later
// loop turn, never inside a call into it) and the session ends.
//
// SPDY exec should drive the transport-neutral exec engine (ExecEngine in
// session/session_exec.h) with its own ExecSink: on_output() -> data on the
// stdout/stderr stream, out_queued() -> what the SPDY side has not written
// yet, on_exit() -> Status JSON on the error stream + FIN. The claims are
// already checked; `exec` holds the argv/stdin/tty/stderr to run.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "session/session_context.h"
#include "session/session_exec.h"
#include "ticket/ticket.h"

namespace shimlet::session {

// Bytes in/out are the raw SPDY byte stream.
struct SpdyTransport {
  // Queues bytes for the client (never blocks; watch queued()).
  virtual void send(const uint8_t* data, size_t len) = 0;
  // Bytes queued and not yet written to the socket: stop producing above ~1 MiB,
  // on_drain() tells when it fell below the low-water mark.
  virtual size_t queued() const = 0;
  // Flushes what is queued, then ends the connection (WS: Close 1000 first).
  virtual void close() = 0;
  virtual ~SpdyTransport() = default;
};

struct SpdyEndpoint {
  // SPDY bytes from the client (arbitrary chunking). The front door stops
  // reading the socket while the endpoint is paused (see pause_input()).
  virtual void on_bytes(const uint8_t* data, size_t len) = 0;
  // The transport's queue fell below its low-water mark.
  virtual void on_drain() = 0;
  // The client is gone (EOF, error, WS close): kill everything, send nothing.
  virtual void on_transport_closed() = 0;
  // The container's init exited (exec: the command dies with the pid
  // namespace and its exit is reported; port-forward: end the session).
  virtual void container_exited() {}
  // While true the front door does not read from the client (backpressure:
  // e.g. a port-forward target socket is not taking bytes). Checked after
  // every on_bytes() and on_drain(), and when the endpoint calls
  // SpdyStart::resume_input().
  virtual bool input_paused() const { return false; }
  virtual ~SpdyEndpoint() = default;
};

enum class SpdyKind { Exec, PortForward };

struct SpdyStart {
  SpdyKind kind = SpdyKind::Exec;
  // Exec: "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
  // "channel.k8s.io"; port-forward: "portforward.k8s.io" (also for the WS tunnel).
  std::string protocol;
  bool websocket_tunnel = false;  // SPDY/3.1+portforward.k8s.io over WebSocket
  ticket::Claims claims;          // verified; jti consumed
  ExecSpec exec;                  // Exec only: what to run (already matches the ticket)
  // Call when input_paused() turned false outside on_bytes()/on_drain().
  std::function<void()> resume_input;
};

// Returns nullptr when the protocol is not supported (the front door answers 501).
std::unique_ptr<SpdyEndpoint> start_spdy(Context& ctx, SpdyTransport& out, SpdyStart start);

}  // namespace shimlet::session
