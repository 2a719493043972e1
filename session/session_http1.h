// The Kubernetes front door's pure parts (no sockets; fuzzed by
// tests/fuzz/http1_fuzz.cc): query decoding, routing of the Kubernetes API and CRI
// streaming URL shapes, protocol negotiation, the WebSocket accept key, and
// the Kubernetes channel protocol's message decoding.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "proto/http1.h"

namespace shimlet::session::http1 {

// The request head comes from the shared bounded reader (proto/http1.h).
using proto::http1::Request;
using proto::http1::RequestReader;

// The front door's bounds: kubectl's command is in the URL, and a ticket (up
// to 64 KiB) may come in one Authorization header line.
inline constexpr proto::http1::Limits kDoorLimits{
    .max_head_bytes = 64 * 1024, .max_headers = 64, .max_header_line_bytes = 64 * 1024, .max_body_bytes = 0};

// application/x-www-form-urlencoded query: key/value pairs in order,
// percent-decoded ('+' is a space). nullopt on a malformed escape.
std::optional<std::vector<std::pair<std::string, std::string>>> parse_query(std::string_view q);
// Kubernetes boolean query values ("true", "1", "t", ...; Go's strconv.ParseBool).
std::optional<bool> parse_bool(std::string_view v);

enum class Verb { Exec, PortForward, Attach };
struct Route {
  int status = 0;  // 0: routed; else 404 / 501 with why
  std::string why;
  Verb verb = Verb::Exec;
  bool kube_api = false;  // /api/v1/... (ticket in Authorization); else CRI /VERB/<ticket>
  std::string token;      // CRI shapes: the ticket from the path
  std::string ns, pod;    // Kubernetes API shapes
};
Route route(std::string_view path);
// The path as it may be logged: CRI tickets replaced by "<ticket>".
std::string loggable_path(std::string_view path);

enum class Transport { WebSocket, Spdy };
struct Negotiation {
  int status = 0;  // 0: ok; else 400 with why
  std::string why;
  Transport transport = Transport::WebSocket;
  std::string protocol;  // chosen subprotocol / X-Stream-Protocol-Version
  std::string ws_key;    // Sec-WebSocket-Key
};
// Which streaming protocol the request asks for and we serve for that verb:
// WebSocket (v5/v4.channel.k8s.io exec, SPDY/3.1+portforward.k8s.io
// port-forward) or SPDY/3.1 (v4..v2.channel.k8s.io, channel.k8s.io exec,
// portforward.k8s.io port-forward).
Negotiation negotiate(const Request& r, Verb verb);
// Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2).
std::string ws_accept(std::string_view key);

// One WebSocket binary message of the Kubernetes channel protocol (client → server).
struct ChannelMessage {
  enum class Kind { Stdin, Resize, CloseStdin, CloseOther, Ignored, Bad } kind = Kind::Ignored;
  std::string_view data;        // Stdin payload
  uint16_t cols = 0, rows = 0;  // Resize
  std::string why;              // Bad
};
// v5 adds channel 255 (close a channel); v4 ignores it.
ChannelMessage decode_channel(const uint8_t* data, size_t len, bool v5);

}  // namespace shimlet::session::http1
