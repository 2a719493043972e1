#include "master/recordings.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>

#include "common/error.h"
#include "common/fd.h"
#include "common/file.h"
#include "common/log.h"
#include "master/registry.h"
#include "spool/spool.h"

namespace shimlet::master {
namespace {

using nlohmann::json;
using DirPtr = std::unique_ptr<DIR, int (*)(DIR*)>;

void make_dir(const std::string& d) {
  if (::mkdir(d.c_str(), 0700) < 0 && errno != EEXIST) throw sys_error("mkdir " + d);
}

std::string slurp(const std::string& path, size_t limit) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return {};
  std::string s;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    s.append(buf, static_cast<size_t>(n));
    if (s.size() > limit) return {};
  }
  return s;
}

json read_json(const std::string& path) {
  json j = json::parse(slurp(path, 1 << 20), nullptr, false);
  return j.is_object() ? j : json();
}

// The upload's owner file (.node), replaced whole: a failed write (a full
// disk) leaves the previous one, never a cut or empty file that would make
// the upload look like another node's.
void write_owner(const std::string& path, const json& o) { write_file_atomic(path, o.dump(), 0600); }

std::string str(const json& o, const char* k) {
  auto it = o.find(k);
  return it != o.end() && it->is_string() ? it->get<std::string>() : std::string();
}

}  // namespace

RecordingStore::RecordingStore(std::string dir, uint64_t max_bytes) : dir_(std::move(dir)), max_bytes_(max_bytes) {
  if (dir_.empty()) throw Error("recording store: empty directory");
  while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
  make_dir(dir_);
  make_dir(dir_ + "/.uploads");
  // The index: every namespace directory's <id>.json that has its .cast.
  DirPtr d(::opendir(dir_.c_str()), ::closedir);
  if (!d) throw sys_error("opendir " + dir_);
  while (dirent* e = ::readdir(d.get())) {
    std::string ns = e->d_name;
    if (ns[0] == '.' || !valid_name(ns)) continue;
    DirPtr sub(::opendir((dir_ + "/" + ns).c_str()), ::closedir);
    if (!sub) continue;
    while (dirent* f = ::readdir(sub.get())) {
      std::string_view n = f->d_name;
      if (n.size() <= 5 || n.substr(n.size() - 5) != ".json") continue;
      std::string id(n.substr(0, n.size() - 5));
      if (spool::valid_sid(id) && ::access(path_of(ns, id).c_str(), F_OK) == 0) index(ns, id);
    }
  }
}

std::string RecordingStore::path_of(const std::string& ns, const std::string& id) const {
  return dir_ + "/" + ns + "/" + id + ".cast";
}

void RecordingStore::index(const std::string& ns, const std::string& id) {
  json m = read_json(dir_ + "/" + ns + "/" + id + ".json");
  if (m.is_null()) return;
  index_[id] = Indexed{ns, str(m, "user"), str(m, "start")};
}

void RecordingStore::drop_upload(const std::string& id) {
  live_.erase(id);
  lru_.remove(id);
  ::unlink((dir_ + "/.uploads/" + id + ".part").c_str());
  ::unlink((dir_ + "/.uploads/" + id + ".node").c_str());
}

void RecordingStore::sweep_stale(int64_t now_s) {
  if (now_s - last_sweep_s_ < 600) return;
  last_sweep_s_ = now_s;
  DirPtr d(::opendir((dir_ + "/.uploads").c_str()), ::closedir);
  if (!d) return;
  std::vector<std::string> stale;
  while (dirent* e = ::readdir(d.get())) {
    std::string_view n = e->d_name;
    if (n.size() <= 5 || n.substr(n.size() - 5) != ".part") continue;
    struct stat st {};
    if (::fstatat(::dirfd(d.get()), e->d_name, &st, 0) == 0 && now_s - st.st_mtim.tv_sec > kStaleUploadS)
      stale.emplace_back(n.substr(0, n.size() - 5));
  }
  for (const auto& id : stale) {
    log::warn("removing a recording upload not resumed for 24 hours", {{"id", id}});
    drop_upload(id);
  }
}

RecordingStore::Live* RecordingStore::live(const std::string& id, const std::string& node, bool create,
                                           std::string& why) {
  auto touch = [&] {
    lru_.remove(id);
    lru_.push_front(id);
    while (lru_.size() > kMaxLive) {
      live_.erase(lru_.back());  // its file stays: rebuilt when it resumes
      lru_.pop_back();
    }
  };
  if (auto it = live_.find(id); it != live_.end()) {
    if (it->second->node != node) {
      why = "recording " + id + " is being uploaded by another node";
      return nullptr;
    }
    touch();
    return it->second.get();
  }
  const std::string part = dir_ + "/.uploads/" + id + ".part", owner = dir_ + "/.uploads/" + id + ".node";
  auto l = std::make_unique<Live>();
  l->node = node;
  if (::access(part.c_str(), F_OK) == 0) {
    json o = read_json(owner);
    if (str(o, "node") != node) {
      why = "recording " + id + " is being uploaded by another node";
      return nullptr;
    }
    l->container_id = str(o, "container_id");
    // Resumed after a restart or an eviction: the reader's state from the bytes kept.
    Fd fd(::open(part.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (!fd) throw sys_error("open " + part);
    std::string buf(1 << 20, '\0');
    for (;;) {
      ssize_t n = ::read(fd.get(), buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw sys_error("read " + part);
      if (n == 0) break;
      if (!l->reader.feed(std::string_view(buf.data(), static_cast<size_t>(n)),
                          [&](recording::Event&& e) { l->summary.add(e); })) {
        why = "stored part of recording " + id + " is unreadable: " + l->reader.error();
        drop_upload(id);
        return nullptr;
      }
      l->size += static_cast<uint64_t>(n);
    }
  } else if (create) {
    // The owner first: a .part never exists without it.
    write_owner(owner, json{{"node", node}});
    Fd fd(::open(part.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!fd) throw sys_error("create " + part);
  } else {
    return nullptr;  // nothing uploaded yet (why stays empty)
  }
  Live* p = l.get();
  live_[id] = std::move(l);
  touch();
  return p;
}

json RecordingStore::metadata(const std::string& id, const Live& l, int64_t now_s, bool registered) const {
  const json& h = l.reader.header();
  const json& s = h["shimlet"];
  const recording::Summary& sum = l.summary;
  json m = {{"kind", "Session"}, {"apiVersion", "shimlet.io/v1"}, {"id", id}, {"node", l.node}};
  for (const char* k :
       {"namespace", "pod", "container", "container_id", "user", "session_id", "shim_session", "jti", "start"})
    m[k] = str(s, k).substr(0, 1024);
  json cmd = json::array();
  if (auto it = s.find("command"); it != s.end() && it->is_array())
    for (const auto& a : *it)
      if (a.is_string() && cmd.size() < 4096) cmd.push_back(a);
  m["command"] = cmd;
  for (const char* k : {"tty", "stdin"}) m[k] = s.contains(k) && s[k].is_boolean() && s[k].get<bool>();
  m["width"] = h["width"];
  m["height"] = h["height"];
  m["duration_s"] = static_cast<double>(sum.duration_us) / 1e6;
  m["bytes"] = l.size;
  m["out_bytes"] = sum.out_bytes;
  m["err_bytes"] = sum.err_bytes;
  m["in_bytes"] = sum.in_bytes;
  m["events"] = sum.events;
  m["resizes"] = sum.resizes;
  m["complete"] = sum.complete();
  m["truncated"] = sum.truncated;
  m["gaps"] = sum.gaps;
  m["end"] = sum.terminal ? json(*sum.terminal) : json("incomplete: the recording has no end marker");
  m["container_registered"] = registered;
  m["stored"] = log::rfc3339(now_s);
  return m;
}

RecordingStore::Upload RecordingStore::upload(const std::string& node, const std::string& id, uint64_t offset,
                                              bool final, std::string_view body, const OwnerOf& owner, int64_t now_s) {
  Upload r;
  auto refuse = [&](int code, std::string why) {
    r.code = code;
    r.error = std::move(why);
    return r;
  };
  if (!enabled()) return refuse(404, "this master keeps no recordings (no --recording-dir)");
  if (!spool::valid_sid(id)) return refuse(400, "invalid recording id");
  sweep_stale(now_s);
  if (auto it = index_.find(id); it != index_.end()) {
    // Stored already: an upload repeated because its answer was lost.
    json m = read_json(dir_ + "/" + it->second.ns + "/" + id + ".json");
    if (str(m, "node") != node) return refuse(400, "recording id " + id + " is taken by another node's recording");
    r.size = m.value("bytes", uint64_t{0});
    r.complete = true;
    return r;
  }
  std::string why;
  Live* l = live(id, node, offset == 0 && !body.empty(), why);
  if (!l) {
    if (!why.empty()) return refuse(400, why);
    r.size = 0;
    if (offset > 0) return refuse(409, "recording " + id + ": nothing received yet, send from offset 0");
    return r;  // a size probe before the first chunk
  }
  r.size = l->size;
  if (offset > l->size)
    return refuse(409, "recording " + id + ": offset " + std::to_string(offset) + " is beyond the " +
                           std::to_string(l->size) + " bytes received");
  uint64_t skip = l->size - offset;
  std::string_view fresh = skip >= body.size() ? std::string_view() : body.substr(skip);
  bool ends_here = final && offset + body.size() == l->size + fresh.size();
  if (!fresh.empty()) {
    if (l->size + fresh.size() > max_bytes_) {
      drop_upload(id);
      return refuse(
          413, "recording " + id + " is larger than this master's limit of " + std::to_string(max_bytes_) + " bytes");
    }
    bool had_header = l->reader.has_header();
    if (!l->reader.feed(fresh, [&](recording::Event&& e) { l->summary.add(e); })) {
      std::string e = "recording " + id + " is not a valid shimlet asciicast: " + l->reader.error();
      drop_upload(id);
      return refuse(400, e);
    }
    if (!had_header && l->reader.has_header()) {
      // A node uploads only its own containers' recordings (as session ends).
      std::string cid = str(l->reader.header()["shimlet"], "container_id");
      if (!valid_id(cid)) {
        drop_upload(id);
        return refuse(400, "recording " + id + " names no valid container_id");
      }
      if (auto o = owner(cid); o && *o != node) {
        drop_upload(id);
        return refuse(403, "container " + cid + " is registered by node \"" + *o + "\"");
      }
      l->container_id = cid;
    }
    const std::string part = dir_ + "/.uploads/" + id + ".part";
    Fd fd;
    try {
      // In here: the reader took the chunk, so a failure must drop it (below).
      if (!had_header && l->reader.has_header())
        write_owner(dir_ + "/.uploads/" + id + ".node", json{{"node", node}, {"container_id", l->container_id}});
      fd = Fd(::open(part.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW));
      if (!fd) throw sys_error("open " + part);
      write_all(fd.get(), fresh.data(), fresh.size());
    } catch (const std::exception& e) {
      // Keep what is whole on disk; the reader is rebuilt from it on resume.
      if (fd && ::ftruncate(fd.get(), static_cast<off_t>(l->size)) < 0) log::error("truncate " + part + " failed");
      live_.erase(id);
      lru_.remove(id);
      log::error("cannot store a recording chunk", {{"id", id}, {"error", e.what()}});
      return refuse(503, "cannot store the recording now: " + std::string(e.what()));
    }
    l->size += fresh.size();
  }
  r.size = l->size;
  if (!ends_here) return r;

  // The last chunk: the whole recording is here.
  if (!l->reader.finish(nullptr) || !l->reader.has_header()) {
    std::string e = "recording " + id + " is not a valid shimlet asciicast: " +
                    (l->reader.error().empty() ? "no header" : l->reader.error());
    drop_upload(id);
    return refuse(400, e);
  }
  std::string ns = str(l->reader.header()["shimlet"], "namespace");
  if (!valid_name(ns) || ns[0] == '.') {
    drop_upload(id);
    return refuse(400, "recording " + id + " names no valid namespace");
  }
  const std::string part = dir_ + "/.uploads/" + id + ".part";
  Fd pf(::open(part.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!pf || ::fsync(pf.get()) < 0) return refuse(503, "cannot store the recording now: fsync failed");
  make_dir(dir_ + "/" + ns);
  json meta = metadata(id, *l, now_s, owner(l->container_id).has_value());
  const std::string meta_path = dir_ + "/" + ns + "/" + id + ".json", tmp = dir_ + "/.uploads/" + id + ".json";
  {
    std::string text = meta.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
    Fd mf(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!mf) throw sys_error("create " + tmp);
    write_all(mf.get(), text.data(), text.size());
    if (::fsync(mf.get()) < 0) throw sys_error("fsync " + tmp);
  }
  if (::rename(tmp.c_str(), meta_path.c_str()) < 0) throw sys_error("rename " + tmp);
  if (::rename(part.c_str(), path_of(ns, id).c_str()) < 0) throw sys_error("rename " + part);
  ::unlink((dir_ + "/.uploads/" + id + ".node").c_str());
  live_.erase(id);
  lru_.remove(id);
  index_[id] = Indexed{ns, str(meta, "user"), str(meta, "start")};
  r.complete = true;
  r.stored = std::move(meta);
  r.stored["path"] = path_of(ns, id);
  return r;
}

std::vector<json> RecordingStore::list(const std::string& ns, const std::string& user, size_t limit) const {
  std::vector<std::pair<std::string, std::string>> hits;  // (start, id)
  for (const auto& [id, e] : index_)
    if ((ns.empty() || e.ns == ns) && (user.empty() || e.user == user)) hits.emplace_back(e.start, id);
  std::sort(hits.begin(), hits.end(), std::greater<>());
  std::vector<json> out;
  for (const auto& [start, id] : hits) {
    if (out.size() >= limit) break;
    json m = read_json(dir_ + "/" + index_.at(id).ns + "/" + id + ".json");
    if (!m.is_null()) out.push_back(std::move(m));
  }
  return out;
}

std::optional<json> RecordingStore::get(const std::string& id) const {
  auto it = index_.find(id);
  if (it == index_.end()) return std::nullopt;
  json m = read_json(dir_ + "/" + it->second.ns + "/" + id + ".json");
  if (m.is_null()) return std::nullopt;
  return m;
}

std::optional<std::string> RecordingStore::read(const std::string& id, uint64_t offset, size_t length) const {
  auto it = index_.find(id);
  if (it == index_.end()) return std::nullopt;
  const std::string path = path_of(it->second.ns, id);
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return std::nullopt;
  std::string out(std::min(length, kMaxReadBytes), '\0');
  size_t got = 0;
  while (got < out.size()) {
    ssize_t n = ::pread(fd.get(), out.data() + got, out.size() - got, static_cast<off_t>(offset + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw sys_error("read " + path);
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  return out;
}

}  // namespace shimlet::master
