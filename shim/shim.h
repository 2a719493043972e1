// shimlet: the per-container shim (see docs/design.md "Processes" and the
// "shim -> session fd contract"). One tiny static process per container: it
// holds the container init's pidfd and namespace fds, listens on TCP and
// fork+execs one shimlet-session per accepted connection, and keeps the
// replay cache its sessions consult over SOCK_SEQPACKET.
//
// It takes everything it needs from argv (the hook writes shim.json and passes
// the same values on the command line) so the shim needs no JSON parser:
//   shimlet --config STATE/<id>/shim.json --pid PID --session-binary PATH
//           [--id ID] [--listen ADDR:PORT] [--local-socket PATH] [--cri-listen ADDR:PORT]
//           [--ready-fd N] [--max-sessions N] [--max-local-sessions N] [--warm-idle-s N]
//           [--hook HOOK [--hook-config HOOK_CONFIG] [--renew-every SECONDS]]
// --config is only handed through to the sessions and the gate (and names
// the directory of STATE/<id>/stats.json).
//
// TCP: the shim accepts nothing on its port. The first connection starts
// the pre-authentication gate (session/gate.h), which takes the listening
// socket and owns every unauthenticated connection; the gate asks the shim
// (shim/gate_proto.h) to consume a ticket's jti and reserve one of
// max_sessions authenticated sessions before it forks one. The CRI listener
// (plain HTTP/1.1, loopback) is the gate's too: it wakes the gate the same
// way and the gate owns its unauthenticated connections. The local socket
// keeps its own path and limit: one session process per connection.
// When the container's init exits, the shim stops its sessions and, given
// --hook, replaces itself with `HOOK [--config HOOK_CONFIG] cleanup ID`,
// which cleans up as poststop would (docs/design.md "Stale state").
#pragma once
#include <sys/types.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace shimlet::shim {

// The shim's own small fd owner and error type. common/fd.h + common/error.h
// would do, but std::system_error pulls strerror -> gettext/iconv into the
// static binary (~300 kB of text per shim); errors here use strerrordesc_np.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Thrown for every setup failure: "WHAT: errno description".
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
Error sys_error(const std::string& what);

struct Options {
  std::string config;          // passed to each session as --config
  std::string session_binary;  // absolute path, exec'd per connection
  std::string id;              // container id (logs only)
  pid_t pid = 0;               // container init (host pid)
  std::string listen = "127.0.0.1:0";
  // Also listen on this unix socket (root's, 0600): `shimctl --local` on the
  // node speaks HTTP/2 there without TLS (docs/design.md "Local socket").
  std::string local_socket;
  // Also listen here for plain HTTP/1.1 with the CRI streaming URL shapes
  // only (/exec/<ticket>, /portforward/<ticket>, node-key tickets): the URLs
  // shimlet-cri gives the kubelet (docs/design.md "CRI proxy"). Its
  // connections go through the gate like the TLS port's. The hook allows
  // loopback only.
  std::string cri_listen;
  int ready_fd = -1;                  // "ready PORT[ CRI_PORT]\n" is written here, then closed
  unsigned max_sessions = 256;        // authenticated TCP sessions; a valid ticket beyond: 503 from the gate
  unsigned max_local_sessions = 256;  // local socket connections beyond this are closed at once
  // Keep one warm session ready after the first connection (docs/design.md
  // "Warm sessions"): a request skips the session's start and cgroup
  // placement. It exits after this many seconds unused; 0: no warm sessions.
  unsigned warm_idle_s = 60;
  // The hook binary and its config: master lease renewal (docs/design.md
  // "Master registration": every renew_every_s seconds `HOOK --config
  // HOOK_CONFIG renew ID`, a short-lived process that does the HTTPS so the
  // shim never links TLS) and the cleanup after the container's exit.
  std::string hook_exec, hook_config;
  unsigned renew_every_s = 0;  // 0 = no master
};

// Throws shimlet::Error with one clear line on bad arguments.
Options parse_args(int argc, const char* const* argv);

// "127.0.0.1:0", "[::1]:8080", "0.0.0.0:1234" -> bound, listening, CLOEXEC,
// non-blocking TCP socket (SO_REUSEADDR). Throws with context.
Fd listen_on(const std::string& addr);
// A listening, CLOEXEC, non-blocking unix stream socket at path, mode 0600
// (any stale socket there is replaced). Paths longer than sun_path are fine:
// it binds through the directory's fd. Throws with context.
Fd listen_local(const std::string& path);
// Port the socket is bound to.
unsigned short bound_port(int sock);

// The container as held by the shim: pidfd of init and its namespace fds that
// differ from the shim's own, in the fixed order user mnt pid net ipc uts
// cgroup time. Kept here rather than using nsenter::open_container because
// shimlet_nsenter pulls libseccomp/libcap-ng/libselinux/nlohmann into what
// must stay a tiny static binary; this is the same ~40 lines without them.
struct Held {
  Fd pidfd;
  std::vector<std::pair<std::string, Fd>> ns;
};
Held open_container(pid_t pid);

// Enters a private mount namespace (propagation slave, so host mounts still
// arrive) where `path` is bind mounted read-only onto itself (CVE-2019-5736).
void protect_binary(const std::string& path);

// Runs the shim until the container exits or SIGTERM/SIGINT; returns the exit code.
int run(const Options& opt);

}  // namespace shimlet::shim
