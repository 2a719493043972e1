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

#include <charconv>
#include <sstream>

#include "common/error.h"
#include "common/event.h"
#include "common/fd.h"
#include "common/file.h"
#include "common/log.h"
#include "proto/tls.h"
#include "session/gate.h"
#include "session/session_internal.h"
#include "session/session_k8s.h"
#include "session/session_warm.h"

namespace shimlet::session {
namespace {

struct Args {
  std::string config;
  std::vector<std::pair<std::string, int>> ns;
  int warm_idle_s = 0;      // > 0: set up now, serve the connection the shim passes within this time
  int gate_idle_s = 0;      // > 0: the pre-authentication gate (session/gate.h), exits after this long unused
  bool gate_zygote = true;  // the gate keeps a zygote placed (off: warm_idle_s 0)
  int gate_cri_fd = -1;     // the gate: the shim's CRI listener (plain HTTP/1.1, CRI shapes only), if any
};

int parse_int(const std::string& k, const std::string& v, int lo, int hi) {
  int n = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
  if (ec != std::errc() || p != v.data() + v.size() || n < lo || n > hi)
    throw Error("bad " + k + " " + v + " (" + std::to_string(lo) + ".." + std::to_string(hi) + ")");
  return n;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; i++) {
    std::string k = argv[i];
    if (k == "--no-zygote") {
      a.gate_zygote = false;
      continue;
    }
    if (i + 1 >= argc) throw Error("missing value for " + k);
    std::string v = argv[++i];
    if (k == "--config") {
      a.config = v;
    } else if (k == "--warm") {
      a.warm_idle_s = parse_int(k, v, 1, 3600);
    } else if (k == "--gate") {
      a.gate_idle_s = parse_int(k, v, 1, 3600);
    } else if (k == "--cri-listener") {
      a.gate_cri_fd = parse_int(k, v, 6, 1 << 20);
    } else if (k == "--ns") {
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) {
        auto eq = item.find('=');
        if (eq == std::string::npos) throw Error("bad --ns item " + item);
        a.ns.emplace_back(item.substr(0, eq), parse_int("--ns fd", item.substr(eq + 1), 0, 1 << 20));
      }
    } else {
      throw Error("unknown argument " + k);
    }
  }
  if (a.config.empty())
    throw Error(
        "usage: shimlet-session --config PATH [--ns TYPE=FD,...] [--warm IDLE_S | --gate IDLE_S [--no-zygote] "
        "[--cri-listener FD]]");
  return a;
}

void on_signal(evutil_socket_t, short, void* arg) {
  log::info("terminating on signal");
  static_cast<FrontDoor*>(arg)->terminate("session terminated by the shim");
}

void on_container_exit(evutil_socket_t, short, void* arg) { static_cast<FrontDoor*>(arg)->container_exited(); }

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
// audited and logged; the session ends (exit code 0).
int refuse_connection(const std::string& container, const std::string& why) {
  log::set_context({{"container", container}, {"peer", peer_of(kConnFd)}});
  log::audit("request.refused", {{"status", 0}, {"stream", 0}, {"reason", why}});
  log::info("connection closed", {{"reason", why}});
  return 0;
}

// Runs the connection's front door until it is done; its exit code.
int serve(event_base* base, std::unique_ptr<FrontDoor> door) {
  EventPtr term = new_event(base, SIGTERM, EV_SIGNAL | EV_PERSIST, on_signal, door.get());
  event_add(term.get(), nullptr);
  if (warm_term_pending()) on_signal(SIGTERM, 0, door.get());  // arrived after a warm session's wait
  EventPtr cexit = new_event(base, kPidFd, EV_READ, on_container_exit, door.get());
  event_add(cexit.get(), nullptr);
  event_base_dispatch(base);
  term.reset();
  cexit.reset();
  int code = door->exit_code();
  door.reset();
  return code;
}

// The pre-authentication gate (session/gate.h) until it admits a connection;
// then this process serves that connection as its session.
int run_gate(const Args& args, Config cfg, nsenter::Container ctr) {
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
                                     std::move(a->sent), a->token, a->claims, a->accepted_unix);
  else
    door = make_http1_front_door(base.get(), std::move(cfg), std::move(ctr), fd, ssl, std::move(*a->k8s),
                                 std::move(a->early), a->accepted_unix);
  return serve(base.get(), std::move(door));
}

}  // namespace

int main(int argc, char** argv) {
  // A warm session is not a session until it gets a connection (ps, tests).
  for (int i = 1; i < argc; i++)
    if (std::string_view(argv[i]) == "--warm") prctl(PR_SET_NAME, "shimlet-warm", 0, 0, 0);
  // The system openssl.cnf has nothing a session needs; parsing it (and what it
  // loads) is paid per connection.
  OPENSSL_init_ssl(OPENSSL_INIT_NO_LOAD_CONFIG, nullptr);
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
    Args args = parse_args(argc, argv);
    Config cfg = load_config(args.config);
    nsenter::Container ctr;
    ctr.init_pid = cfg.pid;
    ctr.pidfd = kPidFd;
    ctr.ns_fds = args.ns;
    ctr.config = oci::load_config(cfg.bundle);
    if (args.gate_idle_s) return run_gate(args, std::move(cfg), std::move(ctr));
    // Made before a warm session's wait: one step less after its connection arrives.
    EventBasePtr base = new_event_base();
    if (args.warm_idle_s && !await_connection(cfg, ctr, args.warm_idle_s)) return 0;
    // The shim's local socket (docs/design.md "Local socket"): root on the
    // node, HTTP/2 with prior knowledge, no TLS. TCP connections never come
    // here: the gate serves them (and becomes their session).
    if (!is_unix_socket(kConnFd)) throw Error("fd 3 is not the local socket's connection (TCP goes to the gate)");
    // The socket file is root's 0600 in a 0700 directory; its peer's uid is
    // checked all the same.
    set_nonblocking(kConnFd);
    if (auto why = local_peer_refusal(kConnFd)) return refuse_connection(cfg.id, *why);
    return serve(base.get(), std::make_unique<Session>(base.get(), std::move(cfg), std::move(ctr), kConnFd, kShimFd));
  } catch (const std::exception& e) {
    log::error("session failed", {{"error", e.what()}});
    return 1;
  }
}

}  // namespace shimlet::session
