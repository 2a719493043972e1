// One HTTPS request to shimlet-master (docs/master-api.md), synchronous and
// bounded by a deadline: used by shimlet-hook (node registration and lease
// renewal, a short-lived process) and shimctl (exec/port-forward grants).
// The master's certificate is verified against the configured CA bundle (or
// the system trust store) including the host name / IP address check.
// Several masters (Masters, below): the first one that can be reached answers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/error.h"
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
  // Resolve + connect + TLS handshake alone, when shorter than timeout_ms
  // (0 = no separate bound): Masters sets it so that a master host that
  // drops packets does not hold the request until its whole deadline.
  int connect_timeout_ms = 0;
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
// The master answered an upgrade with something else than 101.
struct UpgradeRefused : Error {
  using Error::Error;
};
// Sends METHOD PREFIX+path with `Connection: Upgrade`, `Upgrade: protocol`
// (no body) and waits, under t.timeout_ms, for the answer. 101 -> the
// connection; any other status -> UpgradeRefused(error_message of that
// response); transport failures -> Error.
Upgraded upgrade(const Target& t, const std::string& method, const std::string& path, const std::string& protocol);

// Several masters behind one name (shimctl --server A,B or several
// --context; the hook's master.url list), any of which may be down: a
// request goes to the first one that can be reached. A master that cannot
// be reached (resolve, connect, TLS handshake, or the connection failing
// before a whole answer came back: the master died mid-request) is skipped
// for the next one; an HTTP answer, whatever its status, is the answer (a 403
// or a 503 from one master is not asked again elsewhere). Grants, renewals
// and tunnels may be sent twice that way (the first master may have acted
// before it died): a grant's unused ticket expires, a renewal is idempotent,
// a session end record is delivered at least once anyway. The master that
// answered is tried first by the next request of this process. Every master
// but the last gets at most kFailoverConnectMs to connect.
class Masters {
 public:
  static constexpr int kFailoverConnectMs = 3000;
  explicit Masters(std::vector<Target> targets);  // at least one; throws Error otherwise
  // As masterclient::request / upgrade; throws Error naming every master
  // tried when none could be reached.
  Response request(const std::string& method, const std::string& path, const std::string& body);
  Upgraded upgrade(const std::string& method, const std::string& path, const std::string& protocol);
  // The master that answered last (the first before any request).
  const Target& current() const { return targets_[current_]; }
  size_t size() const { return targets_.size(); }
  void set_timeout_ms(int ms);

 private:
  template <typename F>
  auto first_reachable(F&& attempt) -> decltype(attempt(std::declval<const Target&>()));
  std::vector<Target> targets_;
  size_t current_ = 0;
};

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
