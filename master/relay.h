// Byte relay between a client connection the master took over (an HTTP/1.1
// upgrade) and a shim: connect to the shim endpoint from the registry (TLS
// with a pinned certificate, or plain TCP for tunnels whose TLS runs end to
// end inside), send a preamble, then splice both ways with bounded buffers
// (libevent watermarks give backpressure) and idle/connect timeouts, until
// either side closes. Used for kubectl's exec/portforward (TLS, the rewritten
// request head as preamble) and shimctl --proxy tunnels (TCP).
#pragma once
#include <openssl/ssl.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "master/http.h"

namespace shimlet::master {

struct RelayStats {
  uint64_t bytes_in = 0;   // client -> shim (after the preambles)
  uint64_t bytes_out = 0;  // shim -> client
  int64_t duration_ms = 0;
  bool connected = false;  // the shim connection was established
  std::string error;       // why it ended, when not a plain close
};

struct RelayOptions {
  std::string endpoint;  // shim "host:port" / "[v6]:port", from the registry (never from the client)
  // TLS to the shim: a client SSL_CTX (the relay identity, ALPN) and the pin
  // the shim's certificate must match. tls == nullptr: plain TCP.
  SSL_CTX* tls = nullptr;
  std::string pin;
  std::string shim_preamble;    // sent to the shim first (e.g. the request head)
  std::string client_preamble;  // sent to the client once the shim is connected (e.g. a 101 answer)
  // Bytes for the client when the shim cannot be reached (e.g. an HTTP error
  // response); the client is closed after them.
  std::function<std::string(const std::string& why)> connect_error_response;
  std::function<void(const RelayStats&)> on_end;  // once, when both sides are closed
  // As bytes move (counters for metrics): n bytes client -> shim (to_shim) or back.
  std::function<void(bool to_shim, uint64_t n)> on_bytes;
  int connect_timeout_ms = 10000;  // TCP connect + TLS handshake
  int idle_timeout_s = 4 * 3600;   // no bytes either way (the kubelet's default)
  size_t max_buffer = 1 << 20;     // per direction; reading pauses above it
  int linger_ms = 5000;            // flushing after a close: ends after this long without progress
};

// Owns the live relays (freed when they end or with the Relayer).
class Relayer {
 public:
  Relayer();
  ~Relayer();
  Relayer(const Relayer&) = delete;
  Relayer& operator=(const Relayer&) = delete;

  // Starts relaying `client` (already connected, e.g. from Upgraded). Errors
  // (bad endpoint, connect failure) are reported through opt.on_end.
  void start(event_base* base, BevPtr client, RelayOptions opt);
  size_t active() const { return relays_.size(); }

  struct Relay;

 private:
  friend struct Relay;
  std::map<Relay*, std::unique_ptr<Relay>> relays_;
};

}  // namespace shimlet::master
