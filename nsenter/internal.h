// What the files of nsenter/ share (nsenter/nsenter.h is the folder's API):
//   plan.cc     the plan: the container's part and the request's (plan.h)
//   seccomp.cc  OCI seccomp profile -> BPF program (seccomp.h)
//   child.cc    the command's process from its clone to execve: syscalls only
//   zygote.cc   the zygote and the request's wire format
//   spawn.cc    open_container, the wait for execve, spawn()
#pragma once
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstdint>
#include <string>

#include "nsenter/plan.h"

namespace shimlet::nsenter {

inline constexpr int kChildTimeoutMs = 10000;  // from a request to the command past execve

// Child -> parent messages over the SOCK_SEQPACKET pair (fixed size, no
// allocation in the child).
enum : char { kMsgPty = 'T', kMsgExec = 'X', kMsgError = 'E', kMsgLandlock = 'L', kMsgForked = 'F' };
enum : int32_t { kSetup = 0, kNotFound = 127, kNotExecutable = 126 };
struct Report {
  char type;
  int32_t code;  // kSetup / kNotFound / kNotExecutable; kMsgForked: the command's host pid
  int32_t err;   // errno
  char step[120];
};

// Kills and reaps the child unless released (pid = 0).
struct ChildGuard {
  pid_t pid;
  ~ChildGuard() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
      }
    }
  }
};

// The child's failure: a report to the parent, then _exit (1, or 126/127).
[[noreturn]] void child_fail(int sock, const char* step, int err, int32_t code = kSetup);
// The command's process: waits for the parent's 'G', then runc exec's order
// (docs/design.md "nsenter order") until execve.
[[noreturn]] void child_main(int sock, const Plan& plan);

// The request crosses from the session to its zygote as one SOCK_SEQPACKET
// message (a private, fixed format between two copies of this code; stdio
// fds ride along as SCM_RIGHTS): u8 tty, u8 landlock, u8 scope_signal,
// u8 scope_abstract_unix, u16 cols, u16 rows, then length-prefixed (u32)
// string lists argv and extra_env, then the SELinux label.
inline constexpr size_t kMaxRequestBytes = 1 << 20;
std::string encode(const Request& r, const Stdio& io);
// false on anything malformed (truncated, trailing bytes, counts beyond the data).
bool decode(const char* data, size_t len, Request& r, Stdio& io);

// Reads the command's reports until it passes execve (the socket's EOF).
Spawned await_exec(int sock, pid_t pid, const Request& r, bool tty, ChildGuard& guard);

}  // namespace shimlet::nsenter
