#include "recording/spool.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/fd.h"
#include "recording/asciicast.h"
#include "spool/spool.h"

namespace shimlet::recording::spool {
namespace {

using DirPtr = std::unique_ptr<DIR, int (*)(DIR*)>;

DirPtr open_dir(const std::string& dir) {
  DirPtr d(::opendir(dir.c_str()), ::closedir);
  if (!d && errno != ENOENT) throw sys_error("opendir " + dir);
  return d;
}

struct Entry {
  std::string id;
  timespec mtime;
  uint64_t size;
};

// Every <id><suffix> regular file of dir.
std::vector<Entry> scan(const std::string& dir, std::string_view suffix) {
  std::vector<Entry> out;
  DirPtr d = open_dir(dir);
  if (!d) return out;
  while (dirent* e = ::readdir(d.get())) {
    std::string_view n = e->d_name;
    if (n.size() <= suffix.size() || n.substr(n.size() - suffix.size()) != suffix) continue;
    std::string_view id = n.substr(0, n.size() - suffix.size());
    if (!shimlet::spool::valid_sid(id)) continue;
    struct stat st {};
    if (::fstatat(::dirfd(d.get()), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode)) continue;
    out.push_back({std::string(id), st.st_mtim, static_cast<uint64_t>(st.st_size)});
  }
  return out;
}

// Offset just past the last '\n' of fd before `pos` (0: none), reading backwards.
off_t after_newline_before(int fd, off_t pos) {
  char buf[65536];
  while (pos > 0) {
    off_t start = pos > static_cast<off_t>(sizeof buf) ? pos - static_cast<off_t>(sizeof buf) : 0;
    size_t want = static_cast<size_t>(pos - start);
    ssize_t n = ::pread(fd, buf, want, start);
    if (n < 0 && errno == EINTR) continue;
    if (n != static_cast<ssize_t>(want)) throw sys_error("read recording");
    for (size_t i = want; i > 0; i--)
      if (buf[i - 1] == '\n') return start + static_cast<off_t>(i);
    pos = start;
  }
  return 0;
}

// The complete line that ends at `end` (its '\n' at end - 1), without the '\n'.
std::string line_before(int fd, off_t end) {
  off_t start = after_newline_before(fd, end - 1);
  std::string line(static_cast<size_t>(end - 1 - start), '\0');
  if (::pread(fd, line.data(), line.size(), start) != static_cast<ssize_t>(line.size())) return {};
  return line;
}

}  // namespace

uint64_t usage(const std::string& root) {
  uint64_t total = 0;
  DirPtr d = open_dir(root);
  if (!d) return 0;
  while (dirent* e = ::readdir(d.get())) {
    if (e->d_name[0] == '.') continue;
    DirPtr sub(::fdopendir(::openat(::dirfd(d.get()), e->d_name, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW)),
               ::closedir);
    if (!sub) continue;
    while (dirent* f = ::readdir(sub.get())) {
      struct stat st {};
      if (::fstatat(::dirfd(sub.get()), f->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode))
        total += static_cast<uint64_t>(st.st_blocks) * 512;
    }
  }
  return total;
}

void prepare(const std::string& root, const std::string& container_dir) {
  for (const std::string& d : {root, container_dir}) {
    if (::mkdir(d.c_str(), 0700) < 0 && errno != EEXIST) throw sys_error("mkdir " + d);
    struct stat st {};
    if (::lstat(d.c_str(), &st) < 0) throw sys_error("lstat " + d);
    if (!S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 077))
      throw Error(d + ": must be a directory of ours, mode 0700 (recordings are private)");
  }
}

Finished finish_orphans(const std::string& dir, std::string_view why) {
  Finished res;
  for (const Entry& e : scan(dir, ".rec")) {
    const std::string rec = dir + "/" + e.id + ".rec", cast = dir + "/" + e.id + ".cast";
    std::optional<Fd> locked = shimlet::spool::lock_if_free(rec, O_RDWR);
    if (!locked) continue;  // a live session's (or finished just now)
    Fd fd = std::move(*locked);
    struct stat st {};
    if (::fstat(fd.get(), &st) < 0) throw sys_error("fstat " + rec);
    // A session killed in the middle of a write leaves half a line.
    off_t end = after_newline_before(fd.get(), st.st_size);
    if (end == 0) {
      ::unlink(rec.c_str());
      res.dropped++;
      continue;
    }
    if (end != st.st_size && ::ftruncate(fd.get(), end) < 0) throw sys_error("truncate " + rec);
    std::string last = line_before(fd.get(), end);
    nlohmann::json j = nlohmann::json::parse(last, nullptr, false);
    bool terminal = false;
    int64_t t_us = 0;
    if (j.is_array() && j.size() == 3 && j[0].is_number() && j[1].is_string() && j[2].is_string()) {
      // Rounded, not truncated: 1.000001 * 1e6 is 1000000.99..., and a marker
      // at 1.000000 would go back in time (the master refuses such a file).
      t_us = std::llround(j[0].get<double>() * 1e6);
      const std::string& d = j[2].get_ref<const std::string&>();
      terminal = j[1] == "m" && (d.rfind("end:", 0) == 0 || d.rfind("incomplete:", 0) == 0);
    }
    if (!terminal) {
      std::string m = "[" + format_time(t_us) + ", \"m\", ";
      append_json_bytes(m, incomplete_marker(why));
      m += "]\n";
      ssize_t n = ::pwrite(fd.get(), m.data(), m.size(), end);
      if (n != static_cast<ssize_t>(m.size())) {
        // A short write is the disk filling up too (errno is not set).
        if (n < 0 && errno != ENOSPC && errno != EDQUOT) throw sys_error("append to " + rec);
        if (::ftruncate(fd.get(), end) < 0) throw sys_error("truncate " + rec);
      }
    }
    if (::rename(rec.c_str(), cast.c_str()) < 0) throw sys_error("rename " + rec + " -> " + cast);
    res.finished++;
  }
  return res;
}

std::vector<Ready> ready(const std::string& dir) {
  std::vector<Entry> all = scan(dir, ".cast");
  std::sort(all.begin(), all.end(), [](const Entry& a, const Entry& b) {
    if (a.mtime.tv_sec != b.mtime.tv_sec) return a.mtime.tv_sec < b.mtime.tv_sec;
    if (a.mtime.tv_nsec != b.mtime.tv_nsec) return a.mtime.tv_nsec < b.mtime.tv_nsec;
    return a.id < b.id;
  });
  std::vector<Ready> out;
  for (auto& e : all) out.push_back({e.id, dir + "/" + e.id + ".cast", e.size});
  return out;
}

std::vector<std::string> container_dirs(const std::string& root) {
  std::vector<std::string> out;
  DirPtr d = open_dir(root);
  if (!d) return out;
  while (dirent* e = ::readdir(d.get())) {
    if (e->d_name[0] == '.') continue;
    struct stat st {};
    if (::fstatat(::dirfd(d.get()), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
      out.emplace_back(e->d_name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace shimlet::recording::spool
