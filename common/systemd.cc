#include "common/systemd.h"

#include <systemd/sd-daemon.h>

#include <cstdint>

#include "common/log.h"

namespace shimlet::systemd {

namespace {

void notify(const std::string& state) {
  int r = sd_notify(0, state.c_str());
  if (r < 0) log::warn("sd_notify failed", {{"state", state.substr(0, state.find('\n'))}, {"errno", -r}});
}

}  // namespace

void ready(const std::string& status) { notify("READY=1\nSTATUS=" + status); }

void stopping() { notify("STOPPING=1"); }

std::optional<std::chrono::microseconds> watchdog_interval() {
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) return std::nullopt;
  return std::chrono::microseconds(usec);
}

void watchdog_ping() noexcept { sd_notify(0, "WATCHDOG=1"); }

}  // namespace shimlet::systemd
