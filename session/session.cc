// shimlet-session's main: arguments, then the gate, a warm session's wait
// (session_warm.cc) or the local socket's connection, served by its front
// door until it ends.
#include "session/session.h"

#include <event2/event.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/base64.h"
#include "common/error.h"
#include "common/event.h"
#include "common/fd.h"
#include "common/file.h"
#include "common/log.h"
#include "common/pidfd.h"
#include "proto/tls.h"
#include "session/gate.h"
#include "session/session_args.h"
#include "session/session_internal.h"
#include "session/session_k8s.h"
#include "session/session_warm.h"
#include "shim/session_proto.h"

namespace shimlet::session {
namespace {

void on_signal(evutil_socket_t, short, void* arg) {
  log::info("terminating on signal");
  static_cast<FrontDoor*>(arg)->terminate("session terminated by the shim");
}

void on_container_exit(evutil_socket_t, short, void* arg) { static_cast<FrontDoor*>(arg)->container_exited(); }

void on_shim_exit(evutil_socket_t, short, void* arg) {
  log::info("terminating: the shim exited");
  static_cast<FrontDoor*>(arg)->terminate("session terminated: its shim exited");
}

// The shim's pidfd (docs/design.md "Pre-authentication gate"): every session
// ends when its shim exits, however it exits. A gate lineage's sessions after
// the first are not the shim's children (no PDEATHSIG reaches them): the
// first gate opens this and every session it forks inherits it.
Fd open_shim_pidfd() {
  pid_t shim = getppid();
  Fd fd = open_pidfd(shim);
  if (!fd) throw sys_error("pidfd_open(the shim, pid " + std::to_string(shim) + ")");
  if (getppid() != shim) throw Error("the shim exited before the session started");
  return fd;
}

bool is_unix_socket(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  return getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0 && ss.ss_family == AF_UNIX;
}

// Why the local socket's peer may not use it; nullopt for the shim's own user (root).
std::optional<std::string> local_peer_refusal(int fd) {
  ucred cr{};
  socklen_t len = sizeof cr;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0)
    return std::string("local socket: SO_PEERCRED: ") + strerror(errno);
  if (cr.uid != geteuid())
    return "local socket: peer uid " + std::to_string(cr.uid) + " is not " + std::to_string(geteuid());
  return std::nullopt;
}

// A connection refused before any front door exists (local socket peer):
// audited and logged, reported to the shim (refused); the session ends (exit code 0).
int refuse_connection(const std::string& container, const std::string& why) {
  log::set_context({{"container", container}, {"peer", peer_of(kConnFd)}});
  log::audit("request.refused", {{"status", 0}, {"stream", 0}, {"reason", why}});
  log::info("connection closed", {{"reason", why}});
  session_end::Report r;
  r.result = static_cast<uint8_t>(session_end::Result::Refused);
  (void)::send(kShimFd, &r, sizeof r, MSG_DONTWAIT | MSG_NOSIGNAL);
  return 0;
}

// Runs the connection's front door until it is done; its exit code.
int serve(event_base* base, std::unique_ptr<FrontDoor> door, int shim_pidfd) {
  EventPtr term = new_event(base, SIGTERM, EV_SIGNAL | EV_PERSIST, on_signal, door.get());
  event_add(term.get(), nullptr);
  EventPtr shim = new_event(base, shim_pidfd, EV_READ, on_shim_exit, door.get());
  if (event_add(shim.get(), nullptr) < 0) throw Error("event_add(the shim's pidfd) failed");
  if (warm_term_pending()) on_signal(SIGTERM, 0, door.get());  // arrived after a warm session's wait
  EventPtr cexit = new_event(base, kPidFd, EV_READ, on_container_exit, door.get());
  event_add(cexit.get(), nullptr);
  event_base_dispatch(base);
  term.reset();
  shim.reset();
  cexit.reset();
  int code = door->exit_code();
  door.reset();
  return code;
}

// The pre-authentication gate (session/gate.h) until it admits a connection;
// then this process serves that connection as its session.
int run_gate(const Args& args, Config cfg, nsenter::Container ctr, int shim_pidfd) {
  prctl(PR_SET_NAME, "shimlet-gate", 0, 0, 0);
  log::set_component("gate");
  proto::SslCtx ctx =
      proto::make_server_ctx(read_regular_file(cfg.tls_cert, 1 << 16), read_regular_file(cfg.tls_key, 1 << 16),
                             /*allow_http1=*/true);
  Gate gate(cfg, ctr, ctx.get(), GateOptions{args.gate_idle_s, args.gate_zygote, args.gate_cri_fd});
  std::optional<Admitted> a = gate.run();
  if (!a) return 0;
  prctl(PR_SET_NAME, "shimlet-session", 0, 0, 0);
  log::set_component("session");
  EventBasePtr base = new_event_base();
  int fd = a->conn.release();
  SSL* ssl = std::exchange(a->ssl, nullptr);
  std::unique_ptr<FrontDoor> door;
  if (a->h2)
    door = std::make_unique<Session>(base.get(), std::move(cfg), std::move(ctr), fd, ssl, std::move(a->early),
                                     std::move(a->sent), a->token, a->claims, a->accepted_unix, kShimFd);
  else
    door = make_http1_front_door(base.get(), std::move(cfg), std::move(ctr), fd, ssl, std::move(*a->k8s),
                                 std::move(a->early), a->accepted_unix, kShimFd);
  return serve(base.get(), std::move(door), shim_pidfd);
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse_args(argc, argv);
  } catch (const std::exception& e) {
    log::error("session failed", {{"error", e.what()}});
    return 1;
  }
  // A warm session is not a session until it gets a connection (ps, tests).
  if (args.warm_idle_s) prctl(PR_SET_NAME, "shimlet-warm", 0, 0, 0);
  // The system openssl.cnf has nothing a session needs; parsing it (and what it
  // loads) is paid per connection. Only the gate speaks TLS; every other
  // session (local socket, warm) only verifies Ed25519 tickets and hashes,
  // fetched from the default provider by name, so it skips filling OpenSSL's
  // legacy cipher and digest name tables (about 4% of a local exec's CPU).
  if (args.gate_idle_s)
    OPENSSL_init_ssl(OPENSSL_INIT_NO_LOAD_CONFIG, nullptr);
  else
    OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG | OPENSSL_INIT_NO_ADD_ALL_CIPHERS | OPENSSL_INIT_NO_ADD_ALL_DIGESTS,
                        nullptr);
  log::set_component("session");
  // Secrets (TLS key, tickets) live here; nobody may ptrace or read /proc/PID/mem.
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) {
    log::error("session failed", {{"error", sys_error("prctl(PR_SET_DUMPABLE, 0)").what()}});
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  // One fd per forwarded connection (the gate: per unauthenticated
  // connection): allow up to the hard limit.
  if (rlimit rl{}; getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);  // best effort: the soft limit still serves most sessions
  }
  try {
    Config cfg = load_config(args.config);
    nsenter::Container ctr;
    ctr.init_pid = cfg.pid;
    ctr.pidfd = kPidFd;
    ctr.ns_fds = args.ns;
    ctr.config = oci::load_config(cfg.bundle);
    Fd shim_pidfd = open_shim_pidfd();
    if (args.gate_idle_s) return run_gate(args, std::move(cfg), std::move(ctr), shim_pidfd.get());
    // Made before a warm session's wait: one step less after its connection arrives.
    EventBasePtr base = new_event_base();
    if (args.warm_idle_s) {
      // The fetches a first ticket check pays (the signature, the replay
      // digest's SHA-256), done while warming rather than on the request
      // (measured: the ticket check 0.44 -> 0.26 ms, medians of 100).
      if (!cfg.keys.empty()) cfg.keys.front().key.warm_up();
      (void)sha256("");
    }
    if (args.warm_idle_s && !await_connection(cfg, ctr, args.warm_idle_s)) return 0;
    // The shim's local socket (docs/design.md "Local socket"): root on the
    // node, HTTP/2 with prior knowledge, no TLS. TCP connections never come
    // here: the gate serves them (and becomes their session).
    if (!is_unix_socket(kConnFd)) throw Error("fd 3 is not the local socket's connection (TCP goes to the gate)");
    // The socket file is root's 0600 in a 0700 directory; its peer's uid is
    // checked all the same.
    set_nonblocking(kConnFd);
    if (auto why = local_peer_refusal(kConnFd)) return refuse_connection(cfg.id, *why);
    return serve(base.get(), std::make_unique<Session>(base.get(), std::move(cfg), std::move(ctr), kConnFd, kShimFd),
                 shim_pidfd.get());
  } catch (const std::exception& e) {
    log::error("session failed", {{"error", e.what()}});
    return 1;
  }
}

}  // namespace shimlet::session
