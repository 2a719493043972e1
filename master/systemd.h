// shimlet-master under systemd (deploy/systemd/shimlet-master.service,
// Type=notify; the protocol: common/systemd.h): READY=1 once the port is
// bound, WATCHDOG=1 pings from the event loop itself (a wedged loop stops
// them and systemd restarts the master: WatchdogSec=), STOPPING=1 on the way
// out.
#pragma once
#include <string>

#include "common/event.h"

namespace shimlet::master {

class SystemdNotifier {
 public:
  explicit SystemdNotifier(event_base* base) : base_(base) {}
  SystemdNotifier(const SystemdNotifier&) = delete;
  SystemdNotifier& operator=(const SystemdNotifier&) = delete;

  // READY=1 with a STATUS= line; starts the watchdog pings when systemd asked for them.
  void ready(const std::string& status);
  void stopping();

 private:
  event_base* base_;
  EventPtr watchdog_;
};

}  // namespace shimlet::master
