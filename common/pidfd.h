// pidfd system calls. glibc 2.36's <sys/pidfd.h> lacks extern "C" for C++,
// so these call the kernel directly. Both are async-signal-safe.
#pragma once
#include <sys/types.h>

#include "common/fd.h"

namespace shimlet {

// A pidfd of pid (close-on-exec, as every pidfd), or an empty Fd with errno
// set (ESRCH: no such process).
Fd open_pidfd(pid_t pid) noexcept;
// pidfd_send_signal(2): 0, or -1 with errno (ESRCH: it has exited). Signal 0
// only asks whether the process still lives.
int pidfd_signal(int pidfd, int sig) noexcept;

}  // namespace shimlet
