// Pieces shared by shimctl's verbs (exec, port-forward): libevent RAII,
// endpoint parsing, the non-blocking connect to a shim, and sanitizing
// server-provided text for the terminal. Internal to client/.
#pragma once
#include <event2/buffer.h>
#include <event2/event.h>

#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "common/fd.h"

namespace shimlet::client {

template <typename T, void (*F)(T*)>
struct Free {
  void operator()(T* p) const { F(p); }
};
using EventBase = std::unique_ptr<event_base, Free<event_base, event_base_free>>;
using Event = std::unique_ptr<event, Free<event, event_free>>;
using EvBuffer = std::unique_ptr<evbuffer, Free<evbuffer, evbuffer_free>>;

// Server-provided text on our terminal: one line, no control characters,
// at most max bytes, no trailing blanks.
std::string one_line(std::string_view s, size_t max);
// "host:port" or "[v6]:port" (registration "endpoint") -> {host, port}; throws Error.
std::pair<std::string, std::string> split_endpoint(const std::string& ep);
// Resolves the endpoint and starts a non-blocking TCP connect (TCP_NODELAY);
// wait for EV_WRITE and check SO_ERROR. Throws Error with the endpoint named.
Fd start_connect(const std::string& endpoint);

}  // namespace shimlet::client
