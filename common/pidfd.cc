#include "common/pidfd.h"

#include <sys/syscall.h>
#include <unistd.h>

namespace shimlet {

Fd open_pidfd(pid_t pid) noexcept { return Fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0))); }

int pidfd_signal(int pidfd, int sig) noexcept {
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0));
}

}  // namespace shimlet
