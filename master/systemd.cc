#include "master/systemd.h"

#include <systemd/sd-daemon.h>

#include "common/error.h"
#include "common/log.h"

namespace shimlet::master {

void SystemdNotifier::ready(const std::string& status) {
  int r = sd_notify(0, ("READY=1\nSTATUS=" + status).c_str());
  if (r < 0) log::warn("sd_notify READY=1 failed", {{"errno", -r}});
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) return;
  // Ping at half the interval, from the loop: only a loop that runs pings.
  auto ping = [](evutil_socket_t, short, void*) { sd_notify(0, "WATCHDOG=1"); };
  watchdog_ = new_event(base_, -1, EV_PERSIST, ping, nullptr);
  uint64_t half = usec / 2;
  timeval every{static_cast<time_t>(half / 1000000), static_cast<suseconds_t>(half % 1000000)};
  if (event_add(watchdog_.get(), &every) < 0) throw Error("event_add failed for the systemd watchdog");
  sd_notify(0, "WATCHDOG=1");
}

void SystemdNotifier::stopping() {
  watchdog_.reset();
  sd_notify(0, "STOPPING=1");
}

}  // namespace shimlet::master
