#include "session/session_warm.h"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "session/session.h"
#include "session/session_isolation.h"

namespace shimlet::session {

namespace {

volatile sig_atomic_t g_warm_term = 0;
void on_warm_term(int) { g_warm_term = 1; }

}  // namespace

bool warm_term_pending() { return g_warm_term != 0; }

bool await_connection(const Config& cfg, const nsenter::Container& ctr, int idle_s) {
  // SIGTERM (the shim stopping) must not kill us once the placement exists
  // (its cgroup would be left behind): from here it only sets a flag, and is
  // delivered only while ppoll waits, so none is lost between check and wait.
  // The flag handler stays until the event loop's own SIGTERM event replaces
  // it (main checks the flag then).
  struct sigaction sa {};
  sa.sa_handler = on_warm_term;
  sigaction(SIGTERM, &sa, nullptr);
  sigset_t term, old;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  sigprocmask(SIG_BLOCK, &term, &old);
  sigset_t during = old;
  sigdelset(&during, SIGTERM);
  // The shim started us at the lowest priority so warming never competes
  // with a live session; the placement below takes the global cgroup lock
  // and everything after it serves a request: normal priority from here.
  setpriority(PRIO_PROCESS, 0, 0);
  try {
    Confinement::prepare_warm(cfg.isolation, ctr);
  } catch (const std::exception& e) {
    log::warn("warm session without a placed zygote", {{"error", e.what()}});
  }
  // Tells the shim it may hand us a connection now (shim.cc kWarmReady); it
  // may have done so already (the message then only waits in the socket).
  static const char ready = 'W';
  if (::send(kShimFd, &ready, 1, MSG_DONTWAIT | MSG_NOSIGNAL) != 1)
    log::warn("warm session: cannot tell the shim it is ready", {{"error", strerror(errno)}});
  pollfd pfd[2] = {{kShimFd, POLLIN, 0}, {kPidFd, POLLIN, 0}};
  timespec idle{idle_s, 0};
  int n = 0;
  while (!g_warm_term) {
    n = ppoll(pfd, 2, &idle, &during);
    if (n >= 0 || errno != EINTR) break;
  }
  sigprocmask(SIG_SETMASK, &old, nullptr);
  if (g_warm_term || n <= 0 || pfd[1].revents) return false;

  char tag = 0;
  Fd conn;
  try {
    conn = recv_fd(kShimFd, &tag, 1);
  } catch (const std::exception& e) {  // the shim went away, or sent no socket
    log::warn("warm session: no connection from the shim", {{"error", e.what()}});
    return false;
  }
  if (tag != 'C') {
    log::warn("warm session: unexpected message from the shim");
    return false;
  }
  // The connection takes its contract number (dup2 leaves it inheritable, as
  // a cold session's fd 3 is; nsenter closes it before the command runs).
  if (dup2(conn.get(), kConnFd) < 0) throw sys_error("dup2 the passed connection");
  prctl(PR_SET_NAME, "shimlet-session", 0, 0, 0);
  return true;
}

}  // namespace shimlet::session
