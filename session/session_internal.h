// Internals shared by the session's request handlers (not a public header).
#pragma once
#include <event2/event.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cgroup/cgroup.h"
#include "common/fd.h"
#include "nsenter/nsenter.h"
#include "proto/h2.h"
#include "session/session_context.h"
#include "ticket/ticket.h"

namespace shimlet::session {

class Session;

// A request stream's handler. The session owns it until the stream closes.
struct StreamHandler {
  virtual ~StreamHandler() = default;
  virtual void on_data(const uint8_t* data, size_t len) = 0;
  virtual void on_remote_end() = 0;
  virtual void on_drain() {}
  // The stream is gone (closed or reset by the peer): stop and clean up.
  virtual void on_close(uint32_t error_code) = 0;
  // The connection is gone or the session is terminating: kill everything.
  virtual void abort(const std::string& why) = 0;
  // The container's init exited.
  virtual void container_exited() {}
  virtual bool done() const = 0;
};

// Starts a port-forward stream (rest = "PORT[/udp]"); nullptr when refused.
std::unique_ptr<StreamHandler> start_forward(Session& s, int32_t stream, const std::string& rest,
                                             const ticket::Claims& claims);
void resume_forward(StreamHandler& h);

// Starts an exec for an authenticated request; responds on the stream.
std::unique_ptr<StreamHandler> start_exec(Session& s, int32_t stream, const proto::Headers& h,
                                          const ticket::Claims& claims);

// The native front door: HTTP/2 over an established TLS connection (ALPN h2).
class Session : public Context, public FrontDoor, public proto::H2Conn::Handler {
 public:
  // The local socket's connection (no TLS; tickets checked and consumed here).
  Session(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, int shim_fd);
  // A TCP connection the gate admitted (docs/design.md "Pre-authentication
  // gate"): TLS established, `token` accepted for its first request and its
  // jti consumed; early: every plaintext byte the gate read (the preface and
  // that request), replayed into this connection first; sent: what the gate
  // wrote (our SETTINGS, not written again); report_fd: the session's own
  // control socket, for its end report only (-1: none).
  Session(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, SSL* ssl, std::string early,
          std::string sent, const std::string& token, const ticket::Claims& claims, int64_t accepted_unix,
          int report_fd);
  ~Session() override;

  proto::H2Conn& conn() { return *conn_; }
  // Refuses a request with an HTTP status and one clear line (and logs it).
  void refuse(int32_t stream, int status, const std::string& why, const std::string& event = "request.refused");
  // Ends the whole session (after in-flight frames are written).
  void finish();
  void container_exited() override;
  int exit_code() const override { return exit_code_; }
  void terminate(const std::string& why) override { on_closed(why); }
  // True when the connection holds more outbound bytes than the session budget.
  bool over_budget() const { return conn_->total_outbound() > kSessionOutBudget; }
  static constexpr size_t kSessionOutBudget = 32u << 20;

  // H2Conn::Handler
  std::optional<std::string> on_connected(SSL* ssl) override;
  void on_headers(int32_t stream, const proto::Headers& h, bool end_stream) override;
  void on_data(int32_t stream, const uint8_t* data, size_t len) override;
  void on_remote_end(int32_t stream) override;
  void on_stream_close(int32_t stream, uint32_t error_code) override;
  void on_drain(int32_t stream) override;
  void on_stream_refused(int32_t stream) override;
  void on_closed(const std::string& why) override;

 private:
  std::optional<ticket::Claims> authenticate(int32_t stream, const proto::Headers& h, const std::string& verb);

  std::unique_ptr<proto::H2Conn> conn_;
  std::map<int32_t, std::unique_ptr<StreamHandler>> streams_;
  std::string accepted_token_;
  std::optional<ticket::Claims> accepted_claims_;
  bool exec_started_ = false;
  bool finishing_ = false;
  int exit_code_ = 0;
  uint64_t refused_streams_ = 0;  // over max_concurrent_streams (audited once, counted at close)
};

}  // namespace shimlet::session
