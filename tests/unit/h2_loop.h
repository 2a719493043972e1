// Test helpers for proto::H2Conn over a socketpair: a libevent loop run until
// a condition holds (an event, never a fixed sleep), and a client handler that
// collects each stream's response.
#pragma once
#include <event2/event.h>
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>

#include "common/clock.h"
#include "common/event.h"
#include "common/fd.h"
#include "proto/h2.h"

namespace shimlet::test {

// Runs base's loop until done() holds or timeout_ms passed; whether it held.
inline bool run_until(event_base* base, const std::function<bool()>& done, int timeout_ms = 5000) {
  Deadline d(timeout_ms);
  // A persistent tick bounds each turn: the loop returns even when nothing happens.
  EventPtr tick = new_event(
      base, -1, EV_PERSIST, [](evutil_socket_t, short, void*) {}, nullptr);
  timeval tv{0, 10 * 1000};
  event_add(tick.get(), &tv);
  while (!done()) {
    if (d.passed()) return false;
    event_base_loop(base, EVLOOP_ONCE);
  }
  return true;
}

// Both ends of a SOCK_STREAM unix socketpair, non-blocking.
inline std::pair<Fd, Fd> stream_pair() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0) ADD_FAILURE() << "socketpair";
  return {Fd(sv[0]), Fd(sv[1])};
}

// What one stream received.
struct Received {
  proto::Headers headers;
  std::string body;
  bool remote_end = false;
  std::optional<uint32_t> closed;  // the stream's error code once closed
  std::string header(const std::string& name) const {
    const std::string* v = proto::find_header(headers, name);
    return v ? *v : std::string();
  }
};

// A handler that records everything per stream (either role) and returns
// the flow-control window at once.
struct Recorder : proto::H2Conn::Handler {
  proto::H2Conn* conn = nullptr;
  std::map<int32_t, Received> streams;
  std::optional<std::string> closed;  // the connection's close reason
  bool connected = false;
  int refused = 0;
  std::map<int32_t, int> drains;                                   // on_drain calls per stream (0: the connection)
  std::function<void(int32_t, const proto::Headers&)> on_request;  // server role: answer here

  void on_headers(int32_t s, const proto::Headers& h, bool end) override {
    streams[s].headers = h;
    if (end) streams[s].remote_end = true;
    if (on_request) on_request(s, h);
  }
  void on_data(int32_t s, const uint8_t* d, size_t n) override {
    streams[s].body.append(reinterpret_cast<const char*>(d), n);
    conn->consume(s, n);
  }
  void on_remote_end(int32_t s) override { streams[s].remote_end = true; }
  void on_stream_close(int32_t s, uint32_t code) override { streams[s].closed = code; }
  void on_stream_refused(int32_t) override { refused++; }
  void on_drain(int32_t s) override { drains[s]++; }
  // Called while the connection starts; requests can be submitted once the
  // loop turn that called it returned.
  std::optional<std::string> on_connected(SSL*) override {
    connected = true;
    return std::nullopt;
  }
  void on_closed(const std::string& why) override { closed = why; }
};

}  // namespace shimlet::test
