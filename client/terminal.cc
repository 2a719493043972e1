#include "client/terminal.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "common/error.h"
#include "common/fd.h"

namespace shimlet::client {
namespace {

// Saved state, readable from a signal handler (plain data, written before the
// handlers are installed).
struct Saved {
  volatile sig_atomic_t active = 0;
  int have_termios = 0;
  struct termios termios {};
  int have_flags[3] = {0, 0, 0};
  int flags[3] = {0, 0, 0};
};
Saved g_saved;

constexpr int kFatalSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
struct sigaction g_old_actions[sizeof kFatalSignals / sizeof kFatalSignals[0]];

// Async-signal-safe: tcsetattr and fcntl only.
void restore_saved() {
  if (g_saved.have_termios) tcsetattr(0, TCSANOW, &g_saved.termios);
  for (int fd = 2; fd >= 0; --fd)
    if (g_saved.have_flags[fd]) fcntl(fd, F_SETFL, g_saved.flags[fd]);
}

void on_fatal_signal(int sig) {
  // Leave the terminal usable, then die of the same signal (the shell sees
  // 128+sig; the kernel closes the connection, the session kills its processes).
  if (g_saved.active) restore_saved();
  signal(sig, SIG_DFL);
  raise(sig);
}

}  // namespace

WinSize local_winsize() {
  for (int fd = 0; fd <= 2; ++fd) {
    struct winsize ws {};
    if (isatty(fd) && ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 && ws.ws_row > 0) return {ws.ws_col, ws.ws_row};
  }
  return {};
}

bool pollable(int fd) {
  Fd ep(epoll_create1(EPOLL_CLOEXEC));
  if (!ep) throw sys_error("epoll_create1");
  struct epoll_event ev {};
  ev.events = EPOLLIN;
  return epoll_ctl(ep.get(), EPOLL_CTL_ADD, fd, &ev) == 0;
}

LocalStdio::LocalStdio(bool raw, bool nonblock_stdin) {
  g_saved = Saved{};
  for (int fd = 0; fd <= 2; ++fd) {
    if (fd == 0 && !nonblock_stdin) continue;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) continue;  // closed: nothing to restore
    g_saved.flags[fd] = fl;
    g_saved.have_flags[fd] = 1;
  }
  if (raw && isatty(0) && tcgetattr(0, &g_saved.termios) == 0) g_saved.have_termios = 1;
  g_saved.active = 1;
  struct sigaction sa {};
  sa.sa_handler = on_fatal_signal;
  sigemptyset(&sa.sa_mask);
  for (size_t i = 0; i < std::size(kFatalSignals); ++i) sigaction(kFatalSignals[i], &sa, &g_old_actions[i]);

  for (int fd = 0; fd <= 2; ++fd)
    if (g_saved.have_flags[fd] && fcntl(fd, F_SETFL, g_saved.flags[fd] | O_NONBLOCK) < 0) {
      restore();
      throw sys_error("cannot make fd " + std::to_string(fd) + " nonblocking");
    }
  if (g_saved.have_termios) {
    struct termios t = g_saved.termios;
    cfmakeraw(&t);
    if (tcsetattr(0, TCSADRAIN, &t) < 0) {
      restore();
      throw sys_error("cannot put the terminal in raw mode");
    }
  }
}

void LocalStdio::restore() {
  if (!g_saved.active) return;
  restore_saved();
  g_saved.active = 0;
  for (size_t i = 0; i < std::size(kFatalSignals); ++i) sigaction(kFatalSignals[i], &g_old_actions[i], nullptr);
}

LocalStdio::~LocalStdio() { restore(); }

}  // namespace shimlet::client
