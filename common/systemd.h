// The systemd notification protocol (Type=notify units: shimlet-master,
// shimlet-cri): READY=1 once the service serves (so `systemctl start`
// returns when clients can connect, and units ordered after it start then),
// STATUS= lines, WATCHDOG=1 pings, STOPPING=1 on the way out. libsystemd's
// sd_notify speaks it (libsystemd0 is on every Debian system: apt itself
// depends on it); outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
// A failed notification is logged, never thrown: the service works without it.
#pragma once
#include <chrono>
#include <optional>
#include <string>

namespace shimlet::systemd {

// READY=1 with a STATUS= line.
void ready(const std::string& status);
void stopping();
// The watchdog interval systemd asked this process to ping within
// (WatchdogSec=), or nullopt when it asked for none.
std::optional<std::chrono::microseconds> watchdog_interval();
// Async-signal-safe and silent (callable from C callbacks): a ping that fails
// shows as the watchdog's timeout.
void watchdog_ping() noexcept;

}  // namespace shimlet::systemd
