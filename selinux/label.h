// Named label.h, not selinux.h: <selinux/selinux.h> (libselinux) must stay reachable.
// SELinux process labels for session processes (libselinux). When SELinux is
// disabled on the host this backend says so plainly (enabled() == false,
// status() explains) and every call is a no-op; it never pretends.
#pragma once
#include <string>

namespace shimlet::selinux {

bool enabled();
// One line for logs: "SELinux enforcing (policy X)" / "SELinux disabled on this host: labels not applied".
std::string status();
// setexeccon(label) for the next execve of this process (the session child,
// host side, before joining). No-op when disabled or label is empty.
// Throws shimlet::Error with context on failure.
void set_exec_label(const std::string& label);

}  // namespace shimlet::selinux
