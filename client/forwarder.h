// `shimctl port-forward`, the pieces: local listeners (TCP and UDP) or our
// own stdin/stdout, each forwarded connection/flow one HTTP/2 stream over a
// single connection to the shim (docs/design.md "Port-forward").
//   forwarder.cc           the connection to the shim, the listeners, the streams' owner
//   tcp_tunnel.cc          one forwarded TCP connection (or --stdio)
//   udp_flow.cc            the datagrams of one local UDP peer
//   portforward_args.cc    the command line's port specs (client.h)
//
// Memory is bounded end to end: we only return flow-control window
// (consume()) for bytes written to the local socket, so a slow local reader
// stops the shim; and we stop reading a local socket while its stream's
// outbound queue, or the whole connection's, is above its limit.
//
// Objects are never destroyed from inside an H2Conn callback (which can run
// deep inside one of our own calls into H2Conn): finished tunnels and flows go
// to a graveyard emptied from a deferred event.
#pragma once
#include <event2/event.h>
#include <sys/socket.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "client/client.h"
#include "client/net.h"
#include "common/fd.h"
#include "proto/h2.h"
#include "proto/tls.h"

namespace shimlet::client::pf {

constexpr uint32_t kStreamWindow = 8u << 20;       // per stream: > a fast link's bandwidth-delay product
constexpr uint32_t kConnectionWindow = 32u << 20;  // what the shim may have in flight to us in total
constexpr size_t kStreamHigh = 1u << 20;           // stop reading a local socket above this queued
constexpr size_t kSessionHigh = 32u << 20;         // ... or when the whole connection queues this much
constexpr size_t kChunk = 64u << 10;
constexpr size_t kMaxErrorBody = 4096;
constexpr size_t kMaxTunnels = 4096;         // concurrent local connections (beyond: stop accepting)
constexpr size_t kMaxUdpFlows = 256;         // per UDP listener
constexpr size_t kUdpFlowHigh = 256u << 10;  // queued datagram bytes per flow before we drop
constexpr int kUdpIdleS = 60;                // the shim expires its side after 120 s
constexpr int kConnectTimeoutS = 10;
constexpr int kQuitGraceMs = 1000;

// One line to fd (1: stdout, 2: stderr), best effort.
void say(int fd, const std::string& line);
// The shim's {"error": ...} body, or what its status says.
std::string error_message(const std::string& body, int status);
// Why a stream was reset, in words.
std::string reset_reason(uint32_t code);
// "1.2.3.4:80" / "[::1]:80".
std::string addr_string(const sockaddr_storage& ss);

// Something that owns one HTTP/2 stream (a TCP tunnel or a UDP flow).
struct StreamUser {
  virtual ~StreamUser() = default;
  void on_status(int status) { status_ = status; }
  virtual void on_data(const uint8_t* data, size_t len) = 0;
  virtual void on_remote_end() = 0;
  virtual void on_close(uint32_t code) = 0;
  virtual void resume() {}
  // The connection to the shim is gone: close the local side now.
  virtual void abandon() = 0;
  int32_t stream = -1;

 protected:
  // Body bytes of an answer other than 200 (the shim's {"error": ...}):
  // kept, bounded, and their window returned. False on a 200: data is the
  // caller's to deliver.
  bool took_error_body(proto::H2Conn& conn, const uint8_t* data, size_t len);
  int status_ = 0;
  std::string err_body_;
};

struct Listener {
  Fd fd;
  EventPtr ev;
  uint16_t remote = 0;
  bool udp = false;
  std::string where;  // "127.0.0.1:8080"
};

class Forwarder : public proto::H2Conn::Handler {
 public:
  // No TLS context for the shim's local socket (grant.local_socket).
  Forwarder(const Grant& g, const PortForwardOptions& pf, const proto::Identity& id);
  ~Forwarder() override;

  int run();

  // ---- used by tunnels and flows ----
  proto::H2Conn& conn() { return *conn_; }
  event_base* base() { return base_.get(); }
  bool usable() const { return conn_ && !conn_->closed() && !quitting_; }
  bool over_budget() const { return conn_ && conn_->total_outbound() > kSessionHigh; }
  void pause(StreamUser* u) { paused_.insert(u); }
  void unpause(StreamUser* u) { paused_.erase(u); }
  const Grant& grant() const { return grant_; }

  int32_t open_stream(StreamUser* u, const std::string& path);

  template <typename T>
  T* adopt(std::unique_ptr<T> u) {
    T* p = u.get();
    users_[p] = std::move(u);
    return p;
  }
  // u is finished: destroy it once the current callbacks have unwound.
  void retire(StreamUser* u);
  size_t tunnel_count() const { return users_.size(); }
  // --stdio: the one tunnel is done (both directions, or failed).
  void stdio_done(int code) { quit(code, ""); }

  void quit(int code, const std::string& msg);

 private:
  // ---- connection setup ----
  void start_connect();

  static void on_connect_cb(evutil_socket_t fd, short what, void* self);

  std::optional<std::string> on_connected(SSL* ssl) override;

  // Authenticates the connection before we listen: a bad ticket or a gone
  // container is reported at once, and the ticket's short lifetime only has
  // to cover connect + handshake (later streams reuse the accepted ticket).
  void send_open();

  void opened();

  void start_stdio();

  // ---- listeners ----
  void bind_all();

  static uint16_t local_port(int fd);

  std::unique_ptr<Listener> bind_one(const std::string& ip, uint16_t port, const PortSpec& p, std::string& err);

  static void on_accept_cb(evutil_socket_t fd, short, void* self);
  void accept_on(Listener& l);
  void pause_accept(bool retry_timer);
  void resume_accept();

  static void on_udp_cb(evutil_socket_t fd, short, void* self);
  void udp_readable(Listener& l);

 public:
  // UDP flows by local peer address, per listener.
  std::map<Listener*, std::unordered_map<std::string, StreamUser*>> udp_;

 private:
  // ---- H2Conn::Handler ----
  void on_headers(int32_t stream, const proto::Headers& h, bool) override;
  void on_data(int32_t stream, const uint8_t* data, size_t len) override;
  void on_remote_end(int32_t stream) override;
  void on_stream_close(int32_t stream, uint32_t code) override;
  void on_drain(int32_t stream) override;
  void on_closed(const std::string& why) override;

  // ---- deferred work (never inside H2Conn callbacks) ----
  void defer();
  void deferred();
  void stop_loop() { event_base_loopbreak(base_.get()); }

  const Grant& grant_;
  const PortForwardOptions& pf_;
  proto::SslCtx ctx_;
  EventBasePtr base_;
  TunnelBridgePtr bridge_;  // proxy mode: the pump into the master's tunnel (before base_ goes)
  Fd sock_;
  EventPtr connect_ev_, defer_ev_, grace_ev_, accept_retry_ev_;
  std::vector<EventPtr> signals_;
  std::unique_ptr<proto::H2Conn> conn_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::unordered_map<StreamUser*, std::unique_ptr<StreamUser>> users_;
  std::unordered_map<int32_t, StreamUser*> by_stream_;
  std::unordered_set<StreamUser*> paused_;
  std::vector<std::unique_ptr<StreamUser>> graveyard_;
  std::string pin_error_, open_body_;
  int32_t open_id_ = -1;
  int open_status_ = 0;
  int exit_code_ = 0;
  bool conn_ready_ = false, quitting_ = false, accept_paused_ = false;
  bool open_pending_ = false, opened_pending_ = false, abandon_pending_ = false, shutdown_pending_ = false;
  bool stop_loop_deferred_ = false;
};

}  // namespace shimlet::client::pf
