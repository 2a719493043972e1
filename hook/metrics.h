// shimlet-node-metrics: this node's shimlet metrics in the Prometheus text
// format 0.0.4, read from the hook's state directory (docs/operations.md
// "Node metrics"). A binary of its own, not a stage of shimlet-hook: it
// serializes with prometheus-cpp, a C++ shared library that would load the
// shared C++ runtime into every hook run (each container start and stop,
// each lease renewal: twice the hook's start time).
#pragma once
#include <string>

#include "hook/hook.h"

namespace shimlet::hook {

// Per container of c.state_dir: registration.json (labels; whether its shim
// still runs) and the shim's counters file STATE/<id>/stats.json (its sessions,
// how they ended and their bytes, and what became of unauthenticated
// connections), which the shim rewrites as they change. A container whose shim writes none exports its shim_up only.
// Throws shimlet::Error when the state directory exists but cannot be read.
std::string node_metrics(const Config& c);

}  // namespace shimlet::hook
