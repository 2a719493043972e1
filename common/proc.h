// /proc/PID/stat facts that identify a process beyond its (reusable) pid:
// its start time (field 22, clock ticks since boot) and its state. A pid
// recorded with its start time names that process only while both match.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace shimlet {

struct ProcStat {
  char state = '?';         // field 3: R S D Z T ...
  uint64_t flags = 0;       // field 9: PF_* (PF_EXITING 0x4: the process is exiting)
  uint64_t utime = 0;       // field 14, clock ticks
  uint64_t stime = 0;       // field 15, clock ticks
  uint64_t start_time = 0;  // field 22
  uint64_t rss_pages = 0;   // field 24
};
// Parses the text of /proc/PID/stat (comm may hold spaces and parentheses).
// Throws Error on a malformed text.
ProcStat parse_proc_stat(std::string_view text);
// nullopt when the process does not exist (any read failure); throws Error
// on a malformed file.
std::optional<ProcStat> proc_stat(pid_t pid);
// True when pid is a live (not zombie) process started at start_time.
bool same_live_process(pid_t pid, uint64_t start_time);

}  // namespace shimlet
