#include "spool/spool.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>

#include "common/error.h"
#include "common/fd.h"
#include "common/file.h"

namespace shimlet::spool {
namespace {

constexpr std::string_view kSuffix = ".json";
constexpr std::string_view kOpenSuffix = ".open";

struct Entry {
  timespec mtime;
  std::string name;
};

bool older(const Entry& a, const Entry& b) {
  if (a.mtime.tv_sec != b.mtime.tv_sec) return a.mtime.tv_sec < b.mtime.tv_sec;
  if (a.mtime.tv_nsec != b.mtime.tv_nsec) return a.mtime.tv_nsec < b.mtime.tv_nsec;
  return a.name < b.name;
}

// Every <sid><suffix> in dir (no temp files), unsorted.
std::vector<Entry> scan(const std::string& dir, std::string_view suffix = kSuffix) {
  std::vector<Entry> out;
  std::unique_ptr<DIR, int (*)(DIR*)> d(::opendir(dir.c_str()), ::closedir);
  if (!d) {
    if (errno == ENOENT) return out;
    throw sys_error("opendir " + dir);
  }
  while (dirent* e = ::readdir(d.get())) {
    std::string_view n = e->d_name;
    if (n.size() <= suffix.size() || n.substr(n.size() - suffix.size()) != suffix) continue;
    if (!valid_sid(n.substr(0, n.size() - suffix.size()))) continue;
    struct stat st {};
    if (::fstatat(::dirfd(d.get()), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode)) continue;
    out.push_back({st.st_mtim, std::string(n)});
  }
  return out;
}

// A record, or "" when it is unreadable or longer than kMaxRecordBytes
// (parsed as discarded: dropped rather than blocking the outbox).
std::string read_record(int fd) { return read_fd_if_readable(fd, kMaxRecordBytes).value_or(""); }
std::string read_record(const std::string& path) {
  return read_file_if_readable(path, kMaxRecordBytes, O_NOFOLLOW).value_or("");
}

}  // namespace

bool valid_sid(std::string_view sid) {
  if (sid.empty() || sid.size() > 64) return false;
  for (char c : sid)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-')) return false;
  return true;
}

namespace {

// DIR/<sid><suffix> written whole or not at all (temp file + rename, 0600);
// returns the file's fd, locked first when `lock`.
Fd write_file(const std::string& dir, const std::string& sid, std::string_view suffix, const nlohmann::json& record,
              bool lock) {
  if (!valid_sid(sid)) throw Error("session end record: invalid session id \"" + sid.substr(0, 80) + "\"");
  std::string body = record.dump() + "\n";
  if (body.size() > kMaxRecordBytes)
    throw Error("session end record for " + sid + ": " + std::to_string(body.size()) + " bytes, more than " +
                std::to_string(kMaxRecordBytes));
  const std::string path = dir + "/" + sid + std::string(suffix);
  return write_file_atomic(path, body, 0600, [&](int fd) {
    // Locked before it has its name: nobody can see it unlocked while we live.
    if (lock && ::flock(fd, LOCK_EX | LOCK_NB) < 0) throw sys_error("flock the new " + path);
  });
}

}  // namespace

std::vector<std::string> write(const std::string& dir, const std::string& sid, const nlohmann::json& record,
                               size_t max_pending) {
  write_file(dir, sid, kSuffix, record, false);
  std::vector<std::string> dropped;
  std::vector<Entry> all = scan(dir);
  if (all.size() <= max_pending) return dropped;
  // Bounded outbox (a master that is down for long must not fill the node's
  // tmpfs): the oldest records go first, never the one just written.
  std::sort(all.begin(), all.end(), older);
  const std::string mine = sid + std::string(kSuffix);
  size_t excess = all.size() - max_pending;
  for (const Entry& e : all) {
    if (excess == 0) break;
    if (e.name == mine) continue;
    if (::unlink((dir + "/" + e.name).c_str()) == 0)
      dropped.push_back(e.name.substr(0, e.name.size() - kSuffix.size()));
    excess--;
  }
  return dropped;
}

Fd write_open(const std::string& dir, const std::string& sid, const nlohmann::json& record) {
  return write_file(dir, sid, kOpenSuffix, record, true);
}

void remove_open(const std::string& dir, const std::string& sid) {
  const std::string path = dir + "/" + sid + std::string(kOpenSuffix);
  if (::unlink(path.c_str()) < 0 && errno != ENOENT) throw sys_error("unlink " + path);
}

std::optional<Fd> lock_if_free(const std::string& path, int flags) {
  Fd fd(::open(path.c_str(), flags | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) {
    if (errno == ENOENT) return std::nullopt;  // its session (or another sender) just finished it
    throw sys_error("open " + path);
  }
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) < 0) {
    if (errno == EWOULDBLOCK) return std::nullopt;  // held: a live session, or another sender
    throw sys_error("flock " + path);
  }
  return fd;
}

Promoted promote_orphans(const std::string& dir, const std::function<void(nlohmann::json&)>& finish) {
  Promoted res;
  for (const Entry& e : scan(dir, kOpenSuffix)) {
    const std::string sid = e.name.substr(0, e.name.size() - kOpenSuffix.size());
    const std::string path = dir + "/" + e.name;
    std::optional<Fd> locked = lock_if_free(path, O_RDONLY);
    if (!locked) continue;
    Fd fd = std::move(*locked);
    // The session died after writing its final record but before removing
    // this one: the final record (pending or already delivered) wins.
    struct stat st {};
    const std::string final_path = dir + "/" + sid + std::string(kSuffix);
    nlohmann::json r = nlohmann::json::parse(read_record(fd.get()), nullptr, false);
    if (::stat(final_path.c_str(), &st) == 0 || r.is_discarded() || !r.is_object()) {
      ::unlink(path.c_str());
      res.dropped++;
      continue;
    }
    finish(r);
    write_file(dir, sid, kSuffix, r, false);
    ::unlink(path.c_str());
    res.promoted++;
  }
  return res;
}

std::vector<Pending> list(const std::string& dir, size_t max) {
  std::vector<Entry> all = scan(dir);
  std::sort(all.begin(), all.end(), older);
  if (all.size() > max) all.resize(max);
  std::vector<Pending> out;
  for (const Entry& e : all) {
    Pending p;
    p.sid = e.name.substr(0, e.name.size() - kSuffix.size());
    p.path = dir + "/" + e.name;
    p.record = nlohmann::json::parse(read_record(p.path), nullptr, false);
    if (!p.record.is_discarded() && !p.record.is_object()) p.record = nlohmann::json::value_t::discarded;
    out.push_back(std::move(p));
  }
  return out;
}

}  // namespace shimlet::spool
