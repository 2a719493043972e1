// OCI seccomp profiles (config.json linux.seccomp) to a BPF program, built
// with libseccomp the way runc does (libcontainer/seccomp) in the parent; the
// child loads it with seccomp(2).
#pragma once
#include <linux/filter.h>

#include <vector>

#include "oci/oci.h"

namespace shimlet::nsenter {

struct SeccompProgram {
  std::vector<sock_filter> bpf;
  unsigned flags = 0;  // SECCOMP_FILTER_FLAG_*
};
// Throws shimlet::Error naming what is unsupported (action, operator, flag,
// architecture) or sys_error for libseccomp's failures. Syscall names this
// libseccomp does not know are skipped, as runc does.
SeccompProgram compile_seccomp(const oci::Seccomp& s);

}  // namespace shimlet::nsenter
