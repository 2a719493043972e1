// The state directory and the files the hook writes there (docs/design.md
// "State directory"): shim.json for the shim and its sessions,
// registration.json for shimctl and the master.
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <filesystem>

#include "common/error.h"
#include "common/fd.h"
#include "common/log.h"
#include "hook/internal.h"

namespace shimlet::hook {
namespace {

using nlohmann::json;

// Makes sure `dir` is a real directory owned by us and not writable by others.
void check_private_dir(const std::string& dir) {
  struct stat st {};
  if (::lstat(dir.c_str(), &st) < 0) throw sys_error("lstat " + dir);
  if (!S_ISDIR(st.st_mode)) throw Error(dir + ": not a directory (symlinks are refused)");
  if (st.st_uid != ::geteuid()) throw Error(dir + ": owned by uid " + std::to_string(st.st_uid) + ", not by us");
  if (st.st_mode & 022) throw Error(dir + ": writable by group/others");
}

}  // namespace

void ensure_state_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) < 0) {
    if (errno == ENOENT) {
      std::error_code ec;
      std::filesystem::create_directories(dirname_of(dir), ec);
      if (ec) throw Error("create " + dirname_of(dir) + ": " + ec.message());
      if (::mkdir(dir.c_str(), 0700) < 0 && errno != EEXIST) throw sys_error("mkdir " + dir);
    } else if (errno != EEXIST) {
      throw sys_error("mkdir " + dir);
    }
  }
  check_private_dir(dir);
}

std::string dirname_of(const std::string& p) {
  auto s = p.rfind('/');
  return s == std::string::npos ? "." : (s == 0 ? "/" : p.substr(0, s));
}

std::string now_rfc3339() { return log::rfc3339(static_cast<int64_t>(::time(nullptr))); }

// Creates a private file that must not exist yet (fresh container directory).
void write_new_file(const std::string& path, std::string_view content, mode_t mode) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
  if (!fd) throw sys_error("create " + path);
  write_all(fd.get(), content.data(), content.size());
}

Names names_from(const std::string& id, const std::map<std::string, std::string>& a, const std::string& hostname) {
  auto pick = [&](std::initializer_list<const char*> keys, const std::string& fallback) {
    for (const char* k : keys) {
      auto it = a.find(k);
      if (it != a.end() && !it->second.empty()) return it->second;
    }
    return fallback;
  };
  // podman 4.3 sets no name annotation; its default hostname is the id's
  // 12-digit prefix (reachable as a unique id prefix anyway), so only a
  // hostname the user chose names the container.
  std::string fallback = id;
  auto mgr = a.find("io.container.manager");
  if (mgr != a.end() && mgr->second == "libpod" && !hostname.empty() && hostname.size() <= 253 &&
      id.compare(0, hostname.size(), hostname) != 0 && valid_container_id(hostname))
    fallback = hostname;
  // CRI-O/podman's own container name annotation, when present, beats the id.
  std::string own = pick({"io.kubernetes.cri-o.ContainerName"}, fallback);
  return Names{pick({"io.kubernetes.pod.namespace", "io.kubernetes.cri.sandbox-namespace"}, "default"),
               pick({"io.kubernetes.pod.name", "io.kubernetes.cri.sandbox-name"}, own),
               pick({"io.kubernetes.container.name", "io.kubernetes.cri.container-name"}, own)};
}

json registration_json(const oci::State& st, const Started& s) {
  Names n = s.names.pod.empty() ? names_from(st.id, st.annotations) : s.names;
  return json{{"id", st.id},
              {"pid", st.pid},
              {"pid_start_time", s.pid_start_time},
              {"bundle", st.bundle},
              {"runtime_root", ""},
              {"namespace", n.ns},
              {"pod", n.pod},
              {"container", n.container},
              {"endpoint", s.endpoint},
              {"pin", s.pin},
              {"local_socket", s.local_socket},
              {"cri_endpoint", s.cri_endpoint},
              {"shim_pid", s.shim_pid},
              {"shim_start_time", s.shim_start_time},
              {"created", s.created},
              {"annotations", st.annotations}};
}

json shim_json(const Config& c, const oci::State& st, const std::string& dir,
               const std::vector<std::pair<std::string, std::string>>& trusted, const std::optional<Names>& names) {
  json keys = json::array();
  for (const auto& [kid, pem] : trusted) keys.push_back({{"kid", kid}, {"pem", pem}});
  json j{{"id", st.id},
         {"pid", st.pid},
         {"bundle", st.bundle},
         {"listen", c.listen},
         {"trusted_keys", keys},
         {"max_ticket_lifetime_s", c.max_ticket_lifetime_s},
         {"clock_leeway_s", c.clock_leeway_s},
         {"drain_timeout_ms", c.drain_timeout_ms},
         {"max_sessions", c.max_sessions},
         {"preauth_timeout_ms", c.preauth_timeout_ms},
         {"preauth_max_connections", c.preauth_max_connections},
         {"preauth_max_per_source", c.preauth_max_per_source},
         {"preauth_max_memory", c.preauth_max_memory},
         {"tls_cert", dir + "/tls.crt"},
         {"tls_key", dir + "/tls.key"},
         {"session_binary", c.session_binary},
         {"isolation", [&] {
            json iso = c.isolation;
            iso["selinux_lock_dir"] = c.state_dir + "/selinux";
            return iso;
          }()}};
  // Container ids are unique per node only: the session refuses a ticket
  // whose `node` claim names another node.
  if (c.master) {
    j["node"] = c.master->node;
    // Session end records for the master (docs/design.md "Session end records").
    j["ends_dir"] = dir + "/ends";
  }
  // Session recordings (docs/recording.md): the container's spool and the local policy.
  j["recording"] = recording_shim_json(c, st.id);
  // The Kubernetes front door refuses requests naming another pod/container.
  Names n = names ? *names : names_from(st.id, st.annotations);
  j["namespace"] = n.ns;
  j["pod"] = n.pod;
  j["container"] = n.container;
  return j;
}

}  // namespace shimlet::hook
