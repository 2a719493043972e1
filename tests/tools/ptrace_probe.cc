// shimlet-ptrace-probe PID: run INSIDE a container by the isolation tests
// (tests/integration/test_isolation.py, the SELinux VM). Tries the
// ptrace-family accesses to PID that busybox cannot express and prints one
// line per attempt: "ptrace-attach: ALLOWED" or "ptrace-attach: DENIED <errno>".
// Exit status like a command that tried the access: 0 when any attempt was
// allowed, 1 when every one was denied, 2 usage.
// Static (no libraries in a busybox rootfs).
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

int report(const char* what, long rc) {
  if (rc >= 0) {
    printf("%s: ALLOWED\n", what);
    return 1;
  }
  printf("%s: DENIED %s\n", what, strerror(errno));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: shimlet-ptrace-probe PID\n");
    return 2;
  }
  pid_t pid = static_cast<pid_t>(atoi(argv[1]));
  int allowed = 0;
  long rc = ptrace(PTRACE_SEIZE, pid, nullptr, nullptr);
  allowed += report("ptrace-seize", rc);
  if (rc >= 0) ptrace(PTRACE_DETACH, pid, nullptr, nullptr);
  // Reads one word of the target's stack page range: any address works to
  // tell EPERM (denied) from EFAULT (allowed but unmapped).
  char buf[8];
  iovec local{buf, sizeof buf}, remote{reinterpret_cast<void*>(0x10000), sizeof buf};
  errno = 0;
  rc = process_vm_readv(pid, &local, 1, &remote, 1, 0);
  if (rc < 0 && errno == EFAULT) rc = 0;
  allowed += report("process-vm-readv", rc);
  int pfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (pfd >= 0) {
    rc = syscall(SYS_pidfd_getfd, pfd, 0, 0);
    allowed += report("pidfd-getfd", rc);
  } else {
    printf("pidfd-open: DENIED %s\n", strerror(errno));
  }
  fflush(stdout);
  return allowed ? 0 : 1;
}
