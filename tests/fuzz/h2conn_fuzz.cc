// Fuzzes proto::H2Conn as the session's server side with bytes from a client:
// the HTTP/2 preface, frames, HPACK and stream state as nghttp2 parses them,
// and everything H2Conn does with what nghttp2 reports (headers collected per
// stream, bodies queued and consumed, flow control, resets, GOAWAY, close).
// It runs without TLS, as on the shim's local socket (docs/design.md "Local
// socket"): the same code past the TLS layer. The first byte picks how the
// rest is chunked (parsing must not depend on read boundaries); the handler
// answers like the session does (response headers, a little body, end or
// reset). Invariant: the connection's queued output stays within its bound.
#include <event2/event.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "proto/h2.h"

using shimlet::proto::H2Conn;
using shimlet::proto::H2Settings;
using shimlet::proto::Headers;

namespace {

struct Fuzz : H2Conn::Handler {
  H2Conn* conn = nullptr;
  bool closed = false;
  void on_headers(int32_t stream, const Headers& h, bool end_stream) override {
    const std::string* path = shimlet::proto::find_header(h, ":path");
    if (path && *path == "/reset") return conn->reset(stream, NGHTTP2_REFUSED_STREAM);
    if (!conn->respond(stream, {{":status", "200"}, {"x-path", path ? path->substr(0, 64) : ""}})) return;
    if (end_stream) conn->end(stream);
  }
  void on_data(int32_t stream, const uint8_t* data, size_t len) override {
    conn->send(stream, data, len % 97);  // echo a little
    conn->consume(stream, len);
  }
  void on_remote_end(int32_t stream) override { conn->end(stream); }
  void on_stream_close(int32_t, uint32_t) override {}
  void on_closed(const std::string&) override { closed = true; }
};

// Reads (and drops) what the server wrote, so it never blocks on a full socket.
void drain(int fd) {
  char buf[65536];
  while (::read(fd, buf, sizeof buf) > 0) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  size_t chunk = 1 + data[0] % 128;
  data++, size--;
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp) < 0) abort();
  std::unique_ptr<event_base, decltype(&event_base_free)> base(event_base_new(), event_base_free);
  Fuzz f;
  H2Settings st;
  st.max_concurrent_streams = 16;
  st.max_header_list = 16u << 10;
  st.total_high_water = 1u << 20;
  {
    H2Conn conn(base.get(), sp[0], nullptr, H2Conn::Role::Server, &f, st);  // owns sp[0]
    f.conn = &conn;
    event_base_loop(base.get(), EVLOOP_NONBLOCK);
    for (size_t off = 0; off < size && !f.closed; off += chunk) {
      size_t n = std::min(chunk, size - off);
      if (::write(sp[1], data + off, n) != static_cast<ssize_t>(n)) break;  // the server stopped reading
      for (int i = 0; i < 4; i++) event_base_loop(base.get(), EVLOOP_NONBLOCK);
      drain(sp[1]);
      // Handlers echo at most 96 bytes per DATA frame: far below the bound.
      if (conn.total_outbound() > st.total_high_water + (1u << 16)) abort();
    }
    ::shutdown(sp[1], SHUT_WR);  // EOF: the connection must close
    for (int i = 0; i < 64 && !f.closed; i++) {
      event_base_loop(base.get(), EVLOOP_NONBLOCK);
      drain(sp[1]);
    }
    if (!f.closed) abort();
  }
  ::close(sp[1]);
  return 0;
}
