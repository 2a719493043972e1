// One HTTPS request to shimlet-master (docs/master-api.md), synchronous and
// bounded by a deadline: used by shimlet-hook (node registration and lease
// renewal, a short-lived process) and shimctl (exec/port-forward grants).
// The master's certificate is verified against the configured CA bundle (or
// the system trust store) including the host name / IP address check.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "common/fd.h"
#include "common/openssl.h"

struct http_parser;
struct ssl_st;
typedef struct ssl_st SSL;

namespace shimlet::masterclient {

// Where the master is and how we prove who we are.
struct Target {
  std::string server;      // https://HOST[:PORT][/PREFIX]
  std::string ca_pem;      // PEM bundle; "" = the system trust store
  std::string token;       // bearer token ("" = none)
  std::string cert_pem;    // client certificate (+ chain), PEM ("" = none)
  std::string key_pem;     // its private key, PEM
  int timeout_ms = 10000;  // whole request: resolve, connect, TLS, send, receive
  std::string user_agent = "shimlet";
};

struct Url {
  std::string host;  // without brackets for IPv6
  uint16_t port = 443;
  std::string prefix;  // "" or "/path" without trailing '/'
};
// Parses https://HOST[:PORT][/PREFIX]; anything else (http://, userinfo,
// query, fragment) throws shimlet::Error naming the URL.
Url parse_url(std::string_view server);

// Percent-encodes one path segment (libevent's evhttp_uriencode).
std::string path_segment(std::string_view s);

struct Response {
  int status = 0;
  std::string body;
};

inline constexpr size_t kMaxResponseBody = 1 << 20;
inline constexpr size_t kMaxResponseHeaders = 64 * 1024;

// Sends METHOD PREFIX+path with a JSON body (may be empty) and returns the
// response whatever its status. Throws shimlet::Error (one line: what failed
// and where) on transport, TLS, verification or protocol failures.
Response request(const Target& t, const std::string& method, const std::string& path, const std::string& body);

// An HTTP/1.1 upgrade accepted by the master (101): the TLS connection is now
// a byte stream to whatever the master splices it to (shimctl --proxy).
struct Upgraded {
  Fd sock;  // non-blocking, CLOEXEC
  SslPtr ssl;
  std::string leftover;  // bytes read past the 101 response (the tunnel's first bytes)
};
// Sends METHOD PREFIX+path with `Connection: Upgrade`, `Upgrade: protocol`
// (no body) and waits, under t.timeout_ms, for the answer. 101 -> the
// connection; any other status -> Error(error_message of that response).
Upgraded upgrade(const Target& t, const std::string& method, const std::string& path, const std::string& protocol);

// One line for a non-2xx response: the Kubernetes Status "message", else
// "the master answered HTTP N"; control characters removed, bounded.
std::string error_message(const Response& r);

// HTTP/1.1 response parsing, independent of sockets (fuzzed). Bodies and
// headers are bounded (kMaxResponseBody, kMaxResponseHeaders).
class ResponseParser {
 public:
  ResponseParser();
  ~ResponseParser();
  ResponseParser(const ResponseParser&) = delete;
  ResponseParser& operator=(const ResponseParser&) = delete;
  // Feeds bytes (len 0 = EOF). Returns false on a protocol error (error()).
  bool feed(const char* data, size_t len);
  bool done() const { return done_; }
  const std::string& error() const { return err_; }
  Response& response() { return resp_; }

  struct Cb;

 private:
  std::unique_ptr<http_parser> p_;
  Response resp_;
  size_t header_bytes_ = 0;
  bool done_ = false;
  std::string err_;
};

}  // namespace shimlet::masterclient
