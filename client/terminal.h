// Local stdio for an exec: nonblocking stdio and raw tty mode, restored on
// every exit path (RAII, plus fatal-signal handlers that restore and re-raise).
#pragma once
#include <termios.h>

#include <cstdint>

namespace shimlet::client {

struct WinSize {
  uint16_t cols = 80, rows = 24;
  bool operator==(const WinSize&) const = default;
};
// Size of the first of stdin/stdout/stderr that is a tty; 80x24 otherwise.
WinSize local_winsize();

// Whether fd can be watched with epoll (regular files and /dev/null cannot:
// they are always ready).
bool pollable(int fd);

class LocalStdio {
 public:
  // raw: cfmakeraw on stdin when it is a tty. nonblock_stdin: set O_NONBLOCK
  // on fd 0 (only when we read it). stdout/stderr always get O_NONBLOCK.
  LocalStdio(bool raw, bool nonblock_stdin);
  ~LocalStdio();
  LocalStdio(const LocalStdio&) = delete;
  LocalStdio& operator=(const LocalStdio&) = delete;
  // Back to the saved state (idempotent); the destructor calls it.
  void restore();
};

}  // namespace shimlet::client
