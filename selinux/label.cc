#include "selinux/label.h"

#include <selinux/selinux.h>

#include "common/error.h"

namespace shimlet::selinux {

bool enabled() { return is_selinux_enabled() > 0; }

std::string status() {
  if (!enabled()) return "SELinux disabled on this host: session labels not applied";
  int e = security_getenforce();
  return std::string("SELinux ") + (e == 1 ? "enforcing" : e == 0 ? "permissive" : "unknown mode");
}

void set_exec_label(const std::string& label) {
  if (label.empty() || !enabled()) return;
  if (setexeccon(label.c_str()) < 0) throw sys_error("setexeccon(" + label + ")");
}

}  // namespace shimlet::selinux
