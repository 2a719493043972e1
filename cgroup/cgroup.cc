#include "cgroup/cgroup.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "common/error.h"
#include "common/file.h"
#include "common/log.h"
#include "common/pidfd.h"

namespace shimlet::cgroup {
namespace {

constexpr size_t kMaxProcFile = 16 << 20;  // /proc/self/mountinfo with many containers' mounts

// mountinfo field 5 is the mount point, after " - " come fstype, source, super options.
struct Mount {
  std::string root, point, fstype, options;
};

std::vector<Mount> cgroup_mounts() {
  std::istringstream in(shimlet::read_file("/proc/self/mountinfo", kMaxProcFile));
  std::vector<Mount> out;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, parent, dev, root, point, rest;
    ls >> id >> parent >> dev >> root >> point;
    auto dash = line.find(" - ");
    if (dash == std::string::npos) continue;
    std::istringstream tail(line.substr(dash + 3));
    std::string fstype, source, opts;
    tail >> fstype >> source >> opts;
    if (fstype == "cgroup" || fstype == "cgroup2") out.push_back({root, point, fstype, opts});
  }
  return out;
}

bool has_opt(const std::string& opts, const std::string& want) {
  std::istringstream s(opts);
  std::string o;
  while (std::getline(s, o, ','))
    if (o == want) return true;
  return false;
}

}  // namespace

const Entry* Membership::unified() const {
  for (auto& e : entries)
    if (e.v2()) return &e;
  return nullptr;
}

Membership of_pid(pid_t pid) {
  std::string file = "/proc/" + std::to_string(pid) + "/cgroup";
  std::istringstream in(shimlet::read_file(file, kMaxProcFile));
  auto mounts = cgroup_mounts();
  Membership m;
  std::string line;
  while (std::getline(in, line)) {
    // "ID:CONTROLLERS:PATH"
    auto a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    Entry e{line.substr(a + 1, b - a - 1), line.substr(b + 1), ""};
    for (auto& mt : mounts) {
      bool match = e.v2() ? mt.fstype == "cgroup2" : false;
      if (!e.v2() && mt.fstype == "cgroup") {
        match = true;
        std::istringstream cs(e.controllers);
        std::string c;
        while (std::getline(cs, c, ','))
          if (!has_opt(mt.options, c)) match = false;
      }
      if (!match) continue;
      // The mount may show a sub-tree (root != "/"), as inside a cgroup namespace.
      std::string rel = e.path;
      if (mt.root != "/") {
        if (rel.compare(0, mt.root.size(), mt.root) != 0) continue;
        rel = rel.substr(mt.root.size());
      }
      e.dir = mt.point + (rel == "/" ? "" : rel);
      break;
    }
    if (!e.dir.empty()) m.entries.push_back(std::move(e));
  }
  return m;
}

void attach(const Membership& m, pid_t pid) {
  std::string s = std::to_string(pid);
  for (auto& e : m.entries) {
    std::string file = e.dir + "/cgroup.procs";
    Fd fd(::open(file.c_str(), O_WRONLY | O_CLOEXEC));
    if (!fd) throw sys_error("open " + file);
    if (::write(fd.get(), s.data(), s.size()) < 0) throw sys_error("join cgroup " + file + " with pid " + s);
  }
}

bool Entry::has(const std::string& c) const {
  std::istringstream cs(controllers);
  std::string x;
  while (std::getline(cs, x, ','))
    if (x == c) return true;
  return false;
}

// ---- SessionCgroup -------------------------------------------------------

namespace {

// cgroup files are small; cgroup.procs of a session is bounded by its pids.
constexpr size_t kMaxCgroupFile = 4 << 20;

// Gone (the cgroup was removed meanwhile) or unreadable: nullopt.
std::optional<std::string> read_cgroup_file(const std::string& path) {
  return read_file_if_readable(path, kMaxCgroupFile);
}

// Returns 0 or errno.
int write_file_err(const std::string& path, const std::string& value) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd) return errno;
  if (::write(fd.get(), value.data(), value.size()) < 0) return errno;
  return 0;
}

void write_file(const std::string& path, const std::string& value) {
  if (int err = write_file_err(path, value)) throw sys_error("write '" + value + "' to " + path, err);
}

bool exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

// "key value" lines (cpu.stat, memory.events, pids.events, memory.oom_control).
uint64_t key_value(const std::optional<std::string>& content, const std::string& key) {
  if (!content) return 0;
  std::istringstream in(*content);
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) == 0 && line.size() > key.size() && line[key.size()] == ' ')
      return std::strtoull(line.c_str() + key.size() + 1, nullptr, 10);
  }
  return 0;
}

uint64_t number(const std::optional<std::string>& content) {
  return content ? std::strtoull(content->c_str(), nullptr, 10) : 0;
}

std::vector<pid_t> read_pids(const std::string& dir) {
  std::vector<pid_t> out;
  auto c = read_cgroup_file(dir + "/cgroup.procs");
  if (!c) return out;
  std::istringstream in(*c);
  long p;
  while (in >> p)
    if (p > 0) out.push_back(static_cast<pid_t>(p));
  return out;
}

// Controllers a v2 cgroup can use (given by its parent's subtree_control).
bool v2_has(const std::string& dir, const std::string& controller) {
  auto c = read_cgroup_file(dir + "/cgroup.controllers");
  if (!c) return false;
  std::istringstream in(*c);
  std::string x;
  while (in >> x)
    if (x == controller) return true;
  return false;
}

// Freezes (or thaws) a v2 cgroup (cgroup.freeze) or a v1 freezer cgroup;
// waits (bounded) for the frozen state so nothing forks while we kill.
// Returns false when dir cannot be frozen.
bool freeze(const std::string& dir, bool on) {
  using namespace std::chrono;
  if (exists(dir + "/cgroup.freeze")) {
    if (write_file_err(dir + "/cgroup.freeze", on ? "1" : "0")) return false;
    if (!on) return true;
    auto end = steady_clock::now() + milliseconds(500);
    while (key_value(read_cgroup_file(dir + "/cgroup.events"), "frozen") != 1 && steady_clock::now() < end)
      ::usleep(1000);
    return true;
  }
  if (exists(dir + "/freezer.state")) {
    if (write_file_err(dir + "/freezer.state", on ? "FROZEN" : "THAWED")) return false;
    if (!on) return true;
    auto end = steady_clock::now() + milliseconds(500);
    while (steady_clock::now() < end) {
      auto s = read_cgroup_file(dir + "/freezer.state");
      if (s && s->rfind("FROZEN", 0) == 0) break;
      ::usleep(1000);
    }
    return true;
  }
  return false;
}

// SIGKILLs the processes listed in dir/cgroup.procs without racing pid reuse:
// pidfds are opened first, then the list is read again; a pidfd whose pid is
// still listed refers to a process that is in the cgroup now (a recycled pid
// would have made the pidfd stale: pidfd_send_signal then fails with ESRCH).
void kill_listed(const std::string& dir) {
  auto first = read_pids(dir);
  std::vector<std::pair<pid_t, Fd>> fds;
  for (pid_t p : first) {
    Fd fd = open_pidfd(p);
    if (fd) fds.emplace_back(p, std::move(fd));
  }
  auto second = read_pids(dir);
  for (auto& [p, fd] : fds)
    if (std::find(second.begin(), second.end(), p) != second.end())
      pidfd_signal(fd.get(), SIGKILL);  // ESRCH: it exited meanwhile
}

}  // namespace

void validate_name(const std::string& name) {
  bool ok = !name.empty() && name.size() <= 64 && std::isalnum(static_cast<unsigned char>(name[0]));
  for (char ch : name)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_' && ch != '-' && ch != '.') ok = false;
  if (!ok)
    throw Error("invalid session cgroup name '" + name.substr(0, 80) + "': want [A-Za-z0-9][A-Za-z0-9_.-]{0,63}");
}

// Which hierarchies get a session child for these limits (by index in
// container.entries): v1 children only where a limit needs them (or for
// tracking without v2): creating a v1 memory cgroup costs ~20 ms, most of an
// exec's budget.
std::vector<bool> session_layout(const Membership& container, const Limits& limits) {
  const bool have_v2 = container.unified() != nullptr;
  std::vector<bool> make;
  for (const Entry& e : container.entries)
    make.push_back(e.v2() || (e.has("pids") && (limits.pids_max || !have_v2)) ||
                   (e.has("memory") && (limits.memory_max || !have_v2)) || (e.has("cpu") && limits.cpu_weight) ||
                   (!have_v2 && (e.has("cpuacct") || e.has("freezer"))));
  return make;
}

SessionCgroup SessionCgroup::create(const Membership& container, const std::string& name, const Limits& limits) {
  SessionCgroup s = make(container, name, limits);
  s.apply(limits);
  return s;
}

SessionCgroup SessionCgroup::make(const Membership& container, const std::string& name, const Limits& shape) {
  validate_name(name);
  if (shape.cpu_weight > 10000) throw Error("cpu_weight " + std::to_string(shape.cpu_weight) + " out of 1..10000");
  const std::string leaf = "shimlet-" + name;
  SessionCgroup s;  // on a throw below, its destructor removes what was made
  s.name_ = name;
  s.layout_ = session_layout(container, shape);
  for (size_t i = 0; i < container.entries.size(); i++) {
    const Entry& e = container.entries[i];
    Entry se = e;
    if (s.layout_[i]) {
      se.dir = e.dir + "/" + leaf;
      se.path = (e.path == "/" ? "" : e.path) + "/" + leaf;
      if (::mkdir(se.dir.c_str(), 0755) != 0) throw sys_error("create session cgroup " + se.dir);
      s.created_.push_back(se.dir);
    }
    s.m_.entries.push_back(std::move(se));
  }
  if (const Entry* v2 = s.own("")) {
    s.track_ = v2->dir;
  } else if (const Entry* pids = s.own("pids")) {
    s.track_ = pids->dir;
  } else if (!s.created_.empty()) {
    s.track_ = s.created_.front();
  } else {
    throw Error("no cgroup hierarchy (v2, pids or memory) to hold session " + name);
  }
  s.container_ = container;
  return s;
}

const Entry* SessionCgroup::own(const std::string& controller) const {
  const std::string leaf = "/shimlet-" + name_;
  for (const Entry& e : m_.entries) {
    if (e.dir.size() < leaf.size() || e.dir.compare(e.dir.size() - leaf.size(), leaf.size(), leaf) != 0) continue;
    if (controller.empty() ? e.v2() : e.has(controller)) return &e;
  }
  return nullptr;
}

bool SessionCgroup::fits(const Limits& limits) const {
  return limits.cpu_weight <= 10000 && session_layout(container_, limits) == layout_;
}

void SessionCgroup::apply(const Limits& limits) {
  if (limits.cpu_weight > 10000) throw Error("cpu_weight " + std::to_string(limits.cpu_weight) + " out of 1..10000");
  const Entry* v2 = own("");
  const Entry* pids = own("pids");
  const Entry* mem = own("memory");
  const Entry* cpu = own("cpu");
  // On v2 a limit needs its controller in the child's cgroup.controllers,
  // i.e. enabled in the container cgroup's subtree_control. We never enable it
  // ourselves: the container's cgroup holds the container's processes, so the
  // no-internal-processes rule forbids it (EBUSY), and changing the
  // container's own cgroup would break runc (exec, update). docs/cgroups.md.
  auto skip = [&](const std::string& what, const std::string& why) {
    skipped_.push_back(what + ": " + why);
    log::warn("session cgroup limit not applied", {{"session", name_}, {"limit", what}, {"reason", why}});
  };
  const char* no_v2 =
      "the container's cgroup v2 does not delegate this controller (no-internal-processes rule); "
      "the container's own limit still bounds the session";
  if (limits.pids_max) {
    std::string v = std::to_string(limits.pids_max);
    if (pids)
      write_file(pids->dir + "/pids.max", v);
    else if (v2 && v2_has(v2->dir, "pids"))
      write_file(v2->dir + "/pids.max", v);
    else
      skip("pids_max", v2 ? no_v2 : "no pids controller");
  }
  if (limits.memory_max) {
    std::string v = std::to_string(limits.memory_max);
    if (mem) {
      write_file(mem->dir + "/memory.limit_in_bytes", v);
      // memsw (memory+swap) exists only with swap accounting; equal means no swap.
      if (exists(mem->dir + "/memory.memsw.limit_in_bytes")) write_file(mem->dir + "/memory.memsw.limit_in_bytes", v);
    } else if (v2 && v2_has(v2->dir, "memory")) {
      write_file(v2->dir + "/memory.max", v);
      if (exists(v2->dir + "/memory.swap.max")) write_file(v2->dir + "/memory.swap.max", "0");
    } else {
      skip("memory_max", v2 ? no_v2 : "no memory controller");
    }
  }
  if (limits.cpu_weight) {
    if (cpu) {
      // runc's mapping between cpu.shares [2, 262144] and cpu.weight [1, 10000], inverted.
      uint64_t shares = 2 + ((limits.cpu_weight - 1) * 262142) / 9999;
      write_file(cpu->dir + "/cpu.shares", std::to_string(shares));
    } else if (v2 && v2_has(v2->dir, "cpu")) {
      write_file(v2->dir + "/cpu.weight", std::to_string(limits.cpu_weight));
    } else {
      skip("cpu_weight", v2 ? no_v2 : "no cpu controller");
    }
  }
}

SessionCgroup::SessionCgroup(SessionCgroup&& o) noexcept
    : m_(std::move(o.m_)),
      container_(std::move(o.container_)),
      name_(std::move(o.name_)),
      layout_(std::move(o.layout_)),
      created_(std::exchange(o.created_, {})),
      track_(std::move(o.track_)),
      skipped_(std::move(o.skipped_)) {}

SessionCgroup& SessionCgroup::operator=(SessionCgroup&& o) noexcept {
  if (this != &o) {
    destroy();
    m_ = std::move(o.m_);
    container_ = std::move(o.container_);
    name_ = std::move(o.name_);
    layout_ = std::move(o.layout_);
    created_ = std::exchange(o.created_, {});
    track_ = std::move(o.track_);
    skipped_ = std::move(o.skipped_);
  }
  return *this;
}

SessionCgroup::~SessionCgroup() { destroy(); }

void SessionCgroup::destroy() noexcept {
  if (created_.empty()) return;
  try {
    kill_all();
    for (auto it = created_.rbegin(); it != created_.rend(); ++it) {
      // A just-killed task can hold the cgroup busy for a moment (exit in progress).
      int err = 0;
      for (int i = 0; i < 200; ++i) {
        if (::rmdir(it->c_str()) == 0 || errno == ENOENT) {
          err = 0;
          break;
        }
        err = errno;
        if (err != EBUSY) break;
        ::usleep(5000);
      }
      if (err) log::error("cannot remove session cgroup", {{"dir", *it}, {"error", std::strerror(err)}});
    }
  } catch (...) {
    // Logging itself failed (e.g. bad_alloc): nothing more we can do here.
  }
  created_.clear();
}

void SessionCgroup::attach(pid_t pid) const { cgroup::attach(m_, pid); }

std::vector<pid_t> SessionCgroup::pids() const { return track_.empty() ? std::vector<pid_t>{} : read_pids(track_); }

bool SessionCgroup::kill_all(std::chrono::milliseconds timeout) const {
  using namespace std::chrono;
  if (created_.empty()) return true;
  try {
    auto end = steady_clock::now() + timeout;
    useconds_t nap = 500;
    for (;;) {
      // The tracking directory holds every session process; the other
      // session directories are checked too (a process moved out of the v2
      // child by a privileged container would still be in a v1 child).
      bool busy = false;
      for (size_t i = 0; i <= created_.size(); ++i) {
        const std::string& d = i == 0 ? track_ : created_[i - 1];
        if (i > 0 && (d == track_ || busy)) continue;
        if (read_pids(d).empty()) continue;
        busy = true;
        if (exists(d + "/cgroup.kill") && write_file_err(d + "/cgroup.kill", "1") == 0) continue;
        // No cgroup.kill (v1, or v2 before 5.14): freeze so nothing forks
        // while we kill pid by pid, then thaw so the SIGKILLs are delivered.
        std::vector<std::string> frozen;
        for (auto& f : created_)
          if ((exists(f + "/freezer.state") || (f == d && exists(f + "/cgroup.freeze"))) && freeze(f, true))
            frozen.push_back(f);
        kill_listed(d);
        for (auto& f : frozen) freeze(f, false);
      }
      if (!busy) return true;
      if (steady_clock::now() >= end) {
        log::error("session processes survive SIGKILL", {{"cgroup", track_}, {"pids", read_pids(track_).size()}});
        return false;
      }
      ::usleep(nap);
      nap = std::min<useconds_t>(nap * 2, 10000);
    }
  } catch (...) {
    return false;
  }
}

Usage SessionCgroup::usage() const {
  Usage u;
  for (const Entry& e : m_.entries) {
    if (std::find(created_.begin(), created_.end(), e.dir) == created_.end()) continue;
    if (e.v2()) {
      u.cpu_usec = key_value(read_cgroup_file(e.dir + "/cpu.stat"), "usage_usec");
      if (auto p = read_cgroup_file(e.dir + "/memory.peak")) u.memory_peak = number(p);
      u.oom_kills = std::max(u.oom_kills, key_value(read_cgroup_file(e.dir + "/memory.events"), "oom_kill"));
      u.pids_max_hits = std::max(u.pids_max_hits, key_value(read_cgroup_file(e.dir + "/pids.events"), "max"));
      continue;
    }
    if (e.has("cpuacct") && !m_.unified()) u.cpu_usec = number(read_cgroup_file(e.dir + "/cpuacct.usage")) / 1000;
    if (e.has("memory")) {
      u.memory_peak = number(read_cgroup_file(e.dir + "/memory.max_usage_in_bytes"));
      u.oom_kills = std::max(u.oom_kills, key_value(read_cgroup_file(e.dir + "/memory.oom_control"), "oom_kill"));
    }
    if (e.has("pids"))
      u.pids_max_hits = std::max(u.pids_max_hits, key_value(read_cgroup_file(e.dir + "/pids.events"), "max"));
  }
  u.oom_killed = u.oom_kills > 0;
  u.pids_limited = u.pids_max_hits > 0;
  return u;
}

}  // namespace shimlet::cgroup
