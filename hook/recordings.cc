// Session recordings on the node (docs/recording.md "On the node"): the hook
// config's "recording" object, the container's spool directory, and the
// sender the renewer and poststop run, beside the session end records.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "common/clock.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "hook/internal.h"
#include "masterclient/masterclient.h"
#include "recording/spool.h"
#include "spool/spool.h"

namespace shimlet::hook {
namespace {

using nlohmann::json;

// One upload request's body: well below the master's default 1 MiB request
// body limit (--max-request-body-bytes must stay above it).
constexpr size_t kChunk = 512 * 1024;
constexpr const char* kOrphanWhy =
    "the session ended without closing its recording (its process, its shim or its container was killed)";

std::string upload_path(const Config& c, const std::string& id, uint64_t offset, bool final) {
  return "/apis/shimlet.io/v1/nodes/" + masterclient::path_segment(c.master->node) + "/recordings/" +
         masterclient::path_segment(id) + "?offset=" + std::to_string(offset) + (final ? "&final=true" : "");
}

enum class Sent { Done, Dropped, Kept, Busy };

// Uploads one finished recording; `error` says why it was kept.
Sent send_one(const Config& c, masterclient::Masters& t, const recording::spool::Ready& r, int64_t deadline,
              std::string& error) {
  // Gone, or another sender (the renewer and poststop, two renewers sweeping) has it.
  std::optional<Fd> locked = spool::lock_if_free(r.path, O_RDONLY);
  if (!locked) return Sent::Busy;
  Fd fd = std::move(*locked);
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) throw sys_error("fstat " + r.path);
  if (st.st_nlink == 0) return Sent::Busy;  // unlinked by the sender we waited for
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  uint64_t offset = 0;
  bool probe = true;  // first ask how much the master has (resume)
  std::string buf;
  for (;;) {
    int64_t left = deadline - monotonic_ms();
    if (left < 100) {
      error = "deadline reached";
      return Sent::Kept;
    }
    t.set_timeout_ms(static_cast<int>(std::min<int64_t>(c.master->timeout_ms, left)));
    size_t n = probe ? 0 : static_cast<size_t>(std::min<uint64_t>(kChunk, size - offset));
    buf.resize(n);
    if (n && ::pread(fd.get(), buf.data(), n, static_cast<off_t>(offset)) != static_cast<ssize_t>(n))
      throw sys_error("read " + r.path);
    bool final = !probe && offset + n == size;
    std::string path = upload_path(c, r.id, offset, final);
    masterclient::Response resp;
    try {
      resp = t.request("POST", path, buf);
    } catch (const std::exception& e) {
      error = e.what();
      return Sent::Kept;
    }
    json j = json::parse(resp.body, nullptr, false);
    uint64_t have = j.is_object() ? j.value("size", uint64_t{0}) : 0;
    if (resp.status == 200 && j.is_object() && j.value("complete", false)) {
      ::unlink(r.path.c_str());
      return Sent::Done;
    }
    if ((resp.status == 200 || resp.status == 409) && j.is_object() && have <= size) {
      // Where the master stands; an answer that does not move us is a bug
      // on one side, not a reason to loop.
      if (!probe && resp.status == 200 && have != offset + n) {
        error = "the master kept " + std::to_string(have) + " bytes of recording " + r.id +
                " after a chunk ending at " + std::to_string(offset + n);
        return Sent::Kept;
      }
      probe = false;
      offset = have;
      continue;
    }
    if (resp.status == 400 || resp.status == 413) {
      log::error("the master refused a recording: dropped",
                 {{"recording", r.id}, {"status", resp.status}, {"error", masterclient::error_message(resp)}});
      ::unlink(r.path.c_str());
      return Sent::Dropped;
    }
    error = "POST " + path + ": HTTP " + std::to_string(resp.status) + ": " + masterclient::error_message(resp);
    return Sent::Kept;
  }
}

void flush_dir(const Config& c, masterclient::Masters* t, const std::string& dir, int64_t deadline,
               RecordingFlush& res) {
  recording::spool::Finished f = recording::spool::finish_orphans(dir, kOrphanWhy);
  if (f.finished)
    log::warn("recordings of sessions that were killed: finished as incomplete", {{"dir", dir}, {"count", f.finished}});
  if (!t) return;  // no master: the recordings stay on the node
  auto ready = recording::spool::ready(dir);
  for (size_t i = 0; i < ready.size(); i++) {
    if (!res.error.empty()) {
      res.kept += ready.size() - i;
      return;
    }
    switch (send_one(c, *t, ready[i], deadline, res.error)) {
      case Sent::Done:
        res.sent++;
        break;
      case Sent::Dropped:
        res.dropped++;
        break;
      case Sent::Kept:
        res.kept++;
        break;
      case Sent::Busy:
        break;
    }
  }
}

}  // namespace

RecordingConfig parse_recording(const json& v) {
  if (!v.is_object()) throw Error("hook config: recording must be an object");
  RecordingConfig r;
  auto bytes = [](const json& x, const std::string& k, uint64_t lo, uint64_t hi) {
    if (!x.is_number_unsigned() || x.get<uint64_t>() < lo || x.get<uint64_t>() > hi)
      throw Error("hook config: recording." + k + " must be an integer in " + std::to_string(lo) + ".." +
                  std::to_string(hi));
    return x.get<uint64_t>();
  };
  for (auto& [k, x] : v.items()) {
    if (k == "dir") {
      if (!x.is_string() || x.get<std::string>().empty() || x.get<std::string>()[0] != '/' ||
          x.get<std::string>().size() > 1024)
        throw Error("hook config: recording.dir must be an absolute path");
      r.dir = x.get<std::string>();
      while (r.dir.size() > 1 && r.dir.back() == '/') r.dir.pop_back();
    } else if (k == "local") {
      if (!x.is_string() || (x != "none" && x != "tty" && x != "all"))
        throw Error("hook config: recording.local must be \"none\", \"tty\" or \"all\"");
      r.local = x.get<std::string>();
    } else if (k == "disk_full") {
      if (!x.is_string() || (x != "fail-closed" && x != "fail-open"))
        throw Error("hook config: recording.disk_full must be \"fail-closed\" or \"fail-open\"");
      r.fail_closed = x == "fail-closed";
    } else if (k == "max_bytes") {
      r.max_bytes = bytes(x, k, 64u << 10, 1ull << 40);
    } else if (k == "spool_max_bytes") {
      r.spool_max_bytes = bytes(x, k, 1u << 20, 1ull << 50);
    } else {
      throw Error("hook config: recording: unknown key " + k);
    }
  }
  return r;
}

std::string recording_root(const Config& c) {
  return c.recording.dir.empty() ? c.state_dir + "/recordings" : c.recording.dir;
}

json recording_shim_json(const Config& c, const std::string& id) {
  return {{"dir", recording_root(c) + "/" + id}, {"root", recording_root(c)},
          {"local", c.recording.local},          {"disk_full", c.recording.fail_closed ? "fail-closed" : "fail-open"},
          {"max_bytes", c.recording.max_bytes},  {"spool_max_bytes", c.recording.spool_max_bytes}};
}

RecordingFlush flush_recordings(const Config& c, const std::string& id, int budget_ms, bool sweep) {
  RecordingFlush res;
  if (!valid_container_id(id)) throw Error("refusing container id (want [A-Za-z0-9_.-]{1,128}): " + id);
  const int64_t deadline = monotonic_ms() + budget_ms;
  const std::string root = recording_root(c);
  std::optional<masterclient::Masters> t;
  if (c.master) {
    try {
      t.emplace(masters(*c.master));
    } catch (const std::exception& e) {
      res.error = e.what();
    }
  }
  masterclient::Masters* tp = t ? &*t : nullptr;
  flush_dir(c, res.error.empty() ? tp : nullptr, root + "/" + id, deadline, res);
  if (!sweep) return res;
  // Containers that are gone (no state directory) but left recordings.
  for (const std::string& other : recording::spool::container_dirs(root)) {
    if (other == id || !valid_container_id(other) || ::access((c.state_dir + "/" + other).c_str(), F_OK) == 0) continue;
    if (!res.error.empty() || monotonic_ms() > deadline - 100) break;
    const std::string dir = root + "/" + other;
    flush_dir(c, tp, dir, deadline, res);
    if (tp) ::rmdir(dir.c_str());  // only when empty
  }
  return res;
}

}  // namespace shimlet::hook
