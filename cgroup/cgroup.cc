#include "cgroup/cgroup.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "common/error.h"

namespace shimlet::cgroup {
namespace {

// mountinfo field 5 is the mount point, after " - " come fstype, source, super options.
struct Mount {
  std::string root, point, fstype, options;
};

std::vector<Mount> cgroup_mounts() {
  std::ifstream in("/proc/self/mountinfo");
  if (!in) throw sys_error("open /proc/self/mountinfo");
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
  std::ifstream in(file);
  if (!in) throw sys_error("open " + file);
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

}  // namespace shimlet::cgroup
