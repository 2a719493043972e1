#include "common/proc.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <charconv>
#include <string>

#include "common/error.h"
#include "common/fd.h"

namespace shimlet {

ProcStat parse_proc_stat(std::string_view stat) {
  // Field 2 (comm) may contain spaces and parens: fields restart after the last ')'.
  auto rp = stat.rfind(')');
  if (rp == std::string_view::npos) throw Error("/proc/PID/stat: unexpected format");
  ProcStat ps;
  size_t pos = rp + 1;
  auto number = [](std::string_view tok, uint64_t& out, const char* name) {
    auto [p, ec] = std::from_chars(tok.data(), tok.data() + tok.size(), out);
    if (tok.empty() || ec != std::errc() || p != tok.data() + tok.size())
      throw Error(std::string("/proc/PID/stat: bad ") + name);
  };
  for (int field = 3; field <= 24; field++) {
    while (pos < stat.size() && stat[pos] == ' ') pos++;
    size_t end = stat.find_first_of(" \n", pos);
    if (end == std::string_view::npos) end = stat.size();
    std::string_view tok = stat.substr(pos, end - pos);
    pos = end;
    if (field == 3) {
      if (tok.size() != 1) throw Error("/proc/PID/stat: bad state");
      ps.state = tok[0];
    } else if (field == 9) {
      number(tok, ps.flags, "flags");
    } else if (field == 14) {
      number(tok, ps.utime, "utime");
    } else if (field == 15) {
      number(tok, ps.stime, "stime");
    } else if (field == 22) {
      number(tok, ps.start_time, "starttime");
    } else if (field == 24) {
      number(tok, ps.rss_pages, "rss");
    }
  }
  return ps;
}

std::optional<ProcStat> proc_stat(pid_t pid) {
  if (pid <= 0) return std::nullopt;
  std::string path = "/proc/" + std::to_string(pid) + "/stat";
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return std::nullopt;
  char buf[1024];  // comm is at most 16 bytes: the whole line fits
  ssize_t n;
  do n = ::read(fd.get(), buf, sizeof buf);
  while (n < 0 && errno == EINTR);
  if (n <= 0) return std::nullopt;  // ESRCH: it exited between open and read
  return parse_proc_stat(std::string_view(buf, static_cast<size_t>(n)));
}

bool same_live_process(pid_t pid, uint64_t start_time) {
  try {
    auto ps = proc_stat(pid);
    return ps && ps->state != 'Z' && ps->state != 'X' && ps->start_time == start_time;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace shimlet
