#include "selinux/label.h"

#include <errno.h>
#include <fcntl.h>
#include <selinux/selinux.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <memory>

#include "common/error.h"

namespace shimlet::selinux {

bool enabled() { return is_selinux_enabled() > 0; }

std::string status() {
  if (!enabled()) return "SELinux disabled on this host: session labels not applied";
  int e = security_getenforce();
  return std::string("SELinux ") + (e == 1 ? "enforcing" : e == 0 ? "permissive" : "unknown mode");
}

int set_exec_label_nothrow(const std::string& label) noexcept {
  if (label.empty() || !enabled()) return 0;
  return setexeccon(label.c_str()) < 0 ? (errno ? errno : EINVAL) : 0;
}

void set_exec_label(const std::string& label) {
  if (int e = set_exec_label_nothrow(label)) throw sys_error("setexeccon(" + label + ")", e);
}

namespace {

constexpr size_t kMaxLabel = 4096;

unsigned parse_uint(std::string_view s, std::string_view what, std::string_view whole) {
  unsigned v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size())
    throw Error("bad " + std::string(what) + " '" + std::string(s) + "' in SELinux level '" + std::string(whole) + "'");
  return v;
}

unsigned parse_category(std::string_view s, std::string_view whole) {
  if (s.size() < 2 || s[0] != 'c') throw Error("bad category '" + std::string(s) + "' in '" + std::string(whole) + "'");
  unsigned c = parse_uint(s.substr(1), "category", whole);
  if (c > kMaxCategory)
    throw Error("category c" + std::to_string(c) + " above c" + std::to_string(kMaxCategory) + " in '" +
                std::string(whole) + "'");
  return c;
}

bool valid_name(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' ||
           ch == '-';
  });
}

// freecon'd on scope exit.
struct Con {
  char* p = nullptr;
  ~Con() { freecon(p); }
};

}  // namespace

Level Level::parse(std::string_view s) {
  if (s.size() > kMaxLabel) throw Error("SELinux level too long");
  Level l;
  auto colon = s.find(':');
  std::string_view sens = s.substr(0, colon);
  if (sens.size() < 2 || sens[0] != 's') throw Error("bad sensitivity in SELinux level '" + std::string(s) + "'");
  l.sensitivity = parse_uint(sens.substr(1), "sensitivity", s);
  if (colon == std::string_view::npos) return l;
  std::string_view cats = s.substr(colon + 1);
  if (cats.empty()) throw Error("empty category list in SELinux level '" + std::string(s) + "'");
  while (!cats.empty()) {
    auto comma = cats.find(',');
    std::string_view item = cats.substr(0, comma);
    cats = comma == std::string_view::npos ? std::string_view() : cats.substr(comma + 1);
    if (comma != std::string_view::npos && cats.empty())
      throw Error("trailing ',' in SELinux level '" + std::string(s) + "'");
    auto dot = item.find('.');
    if (dot == std::string_view::npos) {
      l.categories.insert(parse_category(item, s));
      continue;
    }
    unsigned lo = parse_category(item.substr(0, dot), s), hi = parse_category(item.substr(dot + 1), s);
    if (lo > hi) throw Error("reversed category range '" + std::string(item) + "' in '" + std::string(s) + "'");
    for (unsigned c = lo; c <= hi; ++c) l.categories.insert(c);
  }
  return l;
}

std::string Level::str() const {
  std::string out = "s" + std::to_string(sensitivity);
  char sep = ':';
  for (auto it = categories.begin(); it != categories.end();) {
    unsigned head = *it, prev = head;
    auto next = std::next(it);
    while (next != categories.end() && *next == prev + 1) prev = *next++;
    // Like the kernel: a run of three or more prints as cA.cB, a pair as cA,cB.
    if (prev - head >= 2) {
      out += sep + ("c" + std::to_string(head)) + ".c" + std::to_string(prev);
      sep = ',';
      it = next;
    } else {
      out += sep + ("c" + std::to_string(head));
      sep = ',';
      ++it;
    }
  }
  return out;
}

bool Level::dominates(const Level& o) const {
  return sensitivity >= o.sensitivity &&
         std::includes(categories.begin(), categories.end(), o.categories.begin(), o.categories.end());
}

Context Context::parse(std::string_view s) {
  if (s.size() > kMaxLabel) throw Error("SELinux context too long");
  // Labels read from /proc or xattrs may carry a trailing NUL.
  while (!s.empty() && (s.back() == '\0' || s.back() == '\n')) s.remove_suffix(1);
  Context c;
  std::string_view rest = s;
  std::string* parts[] = {&c.user, &c.role, &c.type};
  for (auto* p : parts) {
    auto colon = rest.find(':');
    if (colon == std::string_view::npos)
      throw Error("SELinux context '" + std::string(s) + "' is not user:role:type:level");
    *p = std::string(rest.substr(0, colon));
    if (!valid_name(*p)) throw Error("bad field '" + *p + "' in SELinux context '" + std::string(s) + "'");
    rest = rest.substr(colon + 1);
  }
  if (rest.empty()) throw Error("SELinux context '" + std::string(s) + "' has no level (MCS/MLS policy required)");
  auto dash = rest.find('-');
  if (dash == std::string_view::npos) {
    c.level = Level::parse(rest);
    return c;
  }
  Level low = Level::parse(rest.substr(0, dash)), high = Level::parse(rest.substr(dash + 1));
  if (!(low == high))
    throw Error("SELinux context '" + std::string(s) +
                "' has an MLS range; a per-session label needs a container running at a single level");
  c.level = low;
  return c;
}

std::string Context::str() const { return user + ":" + role + ":" + type + ":" + level.str(); }

CategoryRange CategoryRange::parse(std::string_view s) {
  auto sep = s.find_first_of(".-");
  if (sep == std::string_view::npos) throw Error("session category range '" + std::string(s) + "' is not cA.cB");
  CategoryRange r;
  r.first = parse_category(s.substr(0, sep), s);
  r.last = parse_category(s.substr(sep + 1), s);
  if (r.first > r.last) throw Error("session category range '" + std::string(s) + "' is reversed");
  return r;
}

std::string CategoryRange::str() const { return "c" + std::to_string(first) + ".c" + std::to_string(last); }

Context session_context(const Context& container, unsigned session_category, const CategoryRange& reserved) {
  if (!reserved.contains(session_category))
    throw Error("session category c" + std::to_string(session_category) + " outside reserved range " + reserved.str());
  for (unsigned c : container.level.categories)
    if (reserved.contains(c))
      throw Error("container label " + container.str() + " uses category c" + std::to_string(c) +
                  " from the reserved session range " + reserved.str() +
                  ": sessions could not be isolated; configure the container runtime to allocate outside it");
  Context s = container;
  s.level.categories.insert(session_category);
  return s;
}

std::string object_label_at(const std::string& object_ctx, const Level& level) {
  Context c = Context::parse(object_ctx);
  c.level = level;
  return c.str();
}

namespace {
std::string level_stem(const Level& l) {
  std::string n = l.str();
  std::replace(n.begin(), n.end(), ':', '_');  // "s0_c1,c2" ('.' and ',' are fine in names)
  return n;
}
}  // namespace

std::string lock_name(const Level& container, unsigned category) {
  return level_stem(container) + ".c" + std::to_string(category) + ".lock";
}

SessionCategory SessionCategory::allocate(const std::string& dir, const Level& container,
                                          const CategoryRange& reserved) {
  // mkdir -p, 0700 (the state dir normally exists; its selinux/ child may not).
  for (size_t pos = 1; pos != std::string::npos;) {
    pos = dir.find('/', pos + 1);
    std::string part = dir.substr(0, pos);
    if (mkdir(part.c_str(), 0700) < 0 && errno != EEXIST) throw sys_error("mkdir " + part);
  }
  // Rotating start: a per-level counter bumped under its own lock.
  unsigned start = 0;
  {
    std::string path = dir + "/" + level_stem(container) + ".next";
    Fd f(open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!f) throw sys_error("open " + path);
    if (flock(f.get(), LOCK_EX) < 0) throw sys_error("flock " + path);
    char buf[16] = {};
    ssize_t n = pread(f.get(), buf, sizeof buf - 1, 0);
    if (n > 0) std::from_chars(buf, buf + n, start);
    std::string next = std::to_string((start + 1) % reserved.size());
    if (pwrite(f.get(), next.data(), next.size(), 0) < 0 || ftruncate(f.get(), static_cast<off_t>(next.size())) < 0)
      throw sys_error("write " + path);
    start %= reserved.size();
  }
  for (unsigned i = 0; i < reserved.size(); ++i) {
    unsigned c = reserved.first + (start + i) % reserved.size();
    std::string path = dir + "/" + lock_name(container, c);
    Fd f(open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!f) throw sys_error("open " + path);
    if (flock(f.get(), LOCK_EX | LOCK_NB) == 0) return SessionCategory(std::move(f), c);
    if (errno != EWOULDBLOCK) throw sys_error("flock " + path);
  }
  throw Error("no free session category in " + reserved.str() + " for containers at " + container.str() + " (" +
              std::to_string(reserved.size()) + " sessions active)");
}

std::string process_label(pid_t pid) {
  if (!enabled()) return "";
  Con c;
  if (getpidcon(pid, &c.p) < 0) throw sys_error("getpidcon(" + std::to_string(pid) + ")");
  return c.p;
}

std::string fd_label(int fd) {
  if (!enabled()) return "";
  Con c;
  if (fgetfilecon(fd, &c.p) < 0) throw sys_error("fgetfilecon(fd " + std::to_string(fd) + ")");
  return c.p;
}

void label_fd_level(int fd, const Level& level) {
  if (!enabled()) return;
  std::string want = object_label_at(fd_label(fd), level);
  if (fsetfilecon(fd, want.c_str()) < 0) throw sys_error("fsetfilecon(fd " + std::to_string(fd) + ", " + want + ")");
}

int label_fd_level_nothrow(int fd, const Level& level) noexcept {
  try {
    label_fd_level(fd, level);
    return 0;
  } catch (const std::system_error& e) {
    return e.code().value();  // the errno it was thrown with, not whatever errno holds now
  } catch (...) {
    return EINVAL;  // a label we cannot make sense of
  }
}

ScopedSockCreate::ScopedSockCreate(const std::string& label) {
  if (label.empty() || !enabled()) return;
  if (setsockcreatecon(label.c_str()) < 0) throw sys_error("setsockcreatecon(" + label + ")");
  set_ = true;
}
ScopedSockCreate::~ScopedSockCreate() {
  if (set_) setsockcreatecon(nullptr);  // best effort in a destructor; a failure leaves the thread's default
}

ScopedFsCreate::ScopedFsCreate(const std::string& label) {
  if (label.empty() || !enabled()) return;
  if (setfscreatecon(label.c_str()) < 0) throw sys_error("setfscreatecon(" + label + ")");
  set_ = true;
}
ScopedFsCreate::~ScopedFsCreate() {
  if (set_) setfscreatecon(nullptr);
}

}  // namespace shimlet::selinux
