#include "master/systemd.h"

#include "common/error.h"
#include "common/systemd.h"

namespace shimlet::master {

void SystemdNotifier::ready(const std::string& status) {
  systemd::ready(status);
  auto interval = systemd::watchdog_interval();
  if (!interval) return;
  // Ping at half the interval, from the loop: only a loop that runs pings.
  auto ping = [](evutil_socket_t, short, void*) { systemd::watchdog_ping(); };
  watchdog_ = new_event(base_, -1, EV_PERSIST, ping, nullptr);
  auto half = interval->count() / 2;
  timeval every{static_cast<time_t>(half / 1000000), static_cast<suseconds_t>(half % 1000000)};
  if (event_add(watchdog_.get(), &every) < 0) throw Error("event_add failed for the systemd watchdog");
  systemd::watchdog_ping();
}

void SystemdNotifier::stopping() {
  watchdog_.reset();
  systemd::stopping();
}

}  // namespace shimlet::master
