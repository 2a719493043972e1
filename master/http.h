// The master's HTTPS front end: TLS 1.3 (OpenSSL) on a libevent loop, HTTP/2
// (nghttp2) or HTTP/1.1 (the shared bounded reader, proto/http1.h) chosen by
// ALPN, both feeding one handler with a Request and getting a Response (at
// once, or later through a Reply: Response::deferred). Headers, bodies, connection count and time are all bounded; a
// bad request gets a Kubernetes Status error and the server keeps serving.
#pragma once
#include <openssl/ssl.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/event.h"

struct bufferevent;
struct event_base;

namespace shimlet::master {

struct Request {
  std::string method;
  std::string target;                                        // as sent: path[?query]
  std::string path;                                          // before '?'
  std::string query;                                         // after '?', raw
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-case
  std::string body;
  std::string protocol;  // "h2" | "http/1.1"
  std::string peer_ip;
  uint16_t peer_port = 0;
  SSL* ssl = nullptr;    // the connection (peer certificate), valid while handling
  bool upgrade = false;  // HTTP/1.1 Upgrade / CONNECT request (a handler may take the connection over)

  // First header with that (lower-case) name, or "".
  std::string header(std::string_view name) const;
  // Decoded query parameters (libevent's evhttp_parse_query_str); repeated
  // keys keep every value in order.
  std::multimap<std::string, std::string> query_params() const;
};

// Owns a bufferevent: freeing it closes the socket (and frees its SSL).
using BevPtr = BufferEventPtr;

// A client connection handed over after an HTTP/1.1 upgrade request. Bytes
// the client sent after the request head are left in bev's input buffer; the
// receiver owns the connection (callbacks and timeouts are reset to none).
struct Upgraded {
  event_base* base = nullptr;
  BevPtr bev;
};
using UpgradeHandler = std::function<void(Upgraded)>;

struct Response;
// How a handler that cannot answer at once (it waits on etcd) answers later:
// it calls the Reply it was given exactly once, on the loop thread. A Reply
// whose connection or stream is gone does nothing.
using Reply = std::function<void(Response)>;

struct Response {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;
  // Only for an HTTP/1.1 upgrade request: when set, the server writes nothing
  // and hands the connection to it (status is only what gets audited).
  // Otherwise an upgrade request gets the response and the connection closes.
  UpgradeHandler upgrade;
  // Set by a handler that answers later: the server writes nothing now and
  // calls it with the Reply. HTTP/1.1 answers keep their order (the
  // connection reads no further request until the reply); HTTP/2 streams
  // are independent.
  std::function<void(Reply)> deferred;
};

using Handler = std::function<Response(const Request&)>;

// {"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":...,"reason":...,"code":N}
Response status_error(int code, const std::string& message, const std::string& reason = "");
// The Kubernetes reason for an HTTP status (403 -> "Forbidden", ...).
std::string status_reason(int code);

struct Limits {
  size_t max_header_bytes = 32 * 1024;  // request line/pseudo-headers + all headers (also one header line)
  size_t max_headers = 100;
  size_t max_body_bytes = 1024 * 1024;
  int handshake_timeout_s = 10;
  int request_timeout_s = 30;  // a request must arrive completely within this
  int idle_timeout_s = 120;    // no bytes at all
  size_t max_connections = 1024;
  uint32_t max_concurrent_streams = 100;
};

// Serializes a response for HTTP/1.1.
std::string serialize_http1(const Response& r, bool keep_alive, bool head_request);

class Server {
 public:
  // ctx: a server SSL_CTX (ALPN h2 + http/1.1). The handler runs on the loop.
  Server(event_base* base, SSL_CTX* ctx, Handler handler, Limits limits = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  // Binds and listens; returns the bound port (port 0 = ephemeral).
  uint16_t listen(const std::string& address, uint16_t port);
  size_t connections() const;

  struct Conn;

 private:
  friend struct Conn;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shimlet::master
