// Registrations in the state dir and TARGET resolution (shimctl --local).
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <string.h>

#include <algorithm>
#include <cctype>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>

#include "client/client.h"
#include "common/file.h"
#include "common/proc.h"

namespace shimlet::client {
namespace {

constexpr size_t kMaxRegistrationSize = 1 << 20;  // a registration is < 4 KiB; refuse absurd files
constexpr size_t kMaxListed = 5;                  // candidates named in one error, one per line

std::string str_field(const nlohmann::json& j, const char* key, const std::string& path, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) throw Error(path + ": missing \"" + key + "\"");
    return "";
  }
  if (!it->is_string()) throw Error(path + ": \"" + key + "\" is not a string");
  return it->get<std::string>();
}

template <typename T>
T num_field(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer()) return 0;
  if constexpr (std::is_unsigned_v<T>) {
    return it->is_number_unsigned() ? it->template get<T>() : 0;
  } else {
    return it->template get<T>();
  }
}

// podman's 64-hex-digit ids as podman prints them: the first 12.
std::string short_id(const std::string& id) {
  if (id.size() != 64) return id;
  for (char c : id)
    if (!isxdigit(static_cast<unsigned char>(c))) return id;
  return id.substr(0, 12);
}

std::string describe(const Registration& r) {
  std::string out = short_id(r.id);
  if (r.pod != r.id || r.container != r.id) out += " (" + r.ns + "/" + r.pod + ", container " + r.container + ")";
  return out;
}

// A few candidates, one per line, then how many more.
std::string list(const std::vector<const Registration*>& rs, bool names_only = false) {
  std::string out;
  for (size_t n = 0; n < rs.size() && n < kMaxListed; n++) {
    const Registration* r = rs[n];
    out += "\n  " + (names_only ? r->container + " (" + short_id(r->id) + ")" : describe(*r));
  }
  if (rs.size() > kMaxListed) out += "\n  ... and " + std::to_string(rs.size() - kMaxListed) + " more";
  return out;
}

}  // namespace

Registration parse_registration(const std::string& text, const std::string& path) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) throw Error(path + ": not a JSON object");
  Registration r;
  r.path = path;
  r.id = str_field(j, "id", path, true);
  r.endpoint = str_field(j, "endpoint", path, true);
  r.pin = str_field(j, "pin", path, true);
  r.local_socket = str_field(j, "local_socket", path, false);
  r.cri_endpoint = str_field(j, "cri_endpoint", path, false);
  r.ns = str_field(j, "namespace", path, false);
  r.pod = str_field(j, "pod", path, false);
  r.container = str_field(j, "container", path, false);
  r.pid = num_field<int64_t>(j, "pid");
  r.shim_pid = num_field<int64_t>(j, "shim_pid");
  r.pid_start_time = num_field<uint64_t>(j, "pid_start_time");
  r.shim_start_time = num_field<uint64_t>(j, "shim_start_time");
  if (r.id.empty()) throw Error(path + ": empty \"id\"");
  // Fallbacks as the hook documents them (docs/design.md "State directory").
  if (r.ns.empty()) r.ns = "default";
  if (r.pod.empty()) r.pod = r.id;
  if (r.container.empty()) r.container = r.id;
  if (auto a = j.find("annotations"); a != j.end() && a->is_object()) {
    auto get = [&](const char* k) {
      auto it = a->find(k);
      return it != a->end() && it->is_string() ? it->get<std::string>() : std::string();
    };
    r.sandbox = get("io.kubernetes.cri.container-type") == "sandbox" ||
                get("io.kubernetes.docker.type") == "podsandbox" ||
                get("io.kubernetes.cri-o.ContainerType") == "sandbox";
    // containerd / CRI-O name the pod sandbox on every container of the pod
    // (the sandbox's own id on the sandbox itself).
    r.sandbox_id = get("io.kubernetes.cri.sandbox-id");
    if (r.sandbox_id.empty()) r.sandbox_id = get("io.kubernetes.cri-o.SandboxID");
  }
  return r;
}

std::optional<Registration> read_registration(const std::string& path) {
  // Absent, unreadable or too large: not a container dir, or one being
  // created/removed.
  std::optional<std::string> text = read_file_if_readable(path, kMaxRegistrationSize);
  if (!text) return std::nullopt;
  try {
    Registration r = parse_registration(*text, path);
    r.alive = registration_alive(r);
    return r;
  } catch (const Error&) {
    return std::nullopt;  // torn down or foreign: never a reason to fail another target
  }
}

std::vector<Registration> load_registrations(const std::string& state_dir) {
  std::unique_ptr<DIR, int (*)(DIR*)> d(opendir(state_dir.c_str()), closedir);
  if (!d) {
    int e = errno;
    std::string hint = e == EACCES   ? " (--local needs root on the node)"
                       : e == ENOENT ? " (no shimlet on this node, or another --state-dir)"
                                     : "";
    throw Error("cannot read state directory " + state_dir + ": " + strerror(e) + hint);
  }
  std::vector<Registration> out;
  while (dirent* ent = readdir(d.get())) {
    std::string name = ent->d_name;
    if (name == "." || name == "..") continue;
    if (auto r = read_registration(state_dir + "/" + name + "/registration.json")) out.push_back(std::move(*r));
  }
  std::sort(out.begin(), out.end(), [](const Registration& a, const Registration& b) { return a.id < b.id; });
  return out;
}

bool registration_alive(const Registration& r) {
  // The shim exits with its container's init and cleans the state up after
  // it (docs/design.md "Stale state"): a registration whose shim or init is
  // gone (killed, or the window before that cleanup) is offered to nobody.
  auto gone = [](int64_t pid, uint64_t start) {
    if (pid <= 0 || pid > std::numeric_limits<pid_t>::max()) return false;  // not recorded: cannot tell
    return !(start ? same_live_process(static_cast<pid_t>(pid), start)
                   : ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
  };
  return !gone(r.shim_pid, r.shim_start_time) && !(r.pid_start_time && gone(r.pid, r.pid_start_time));
}

const Registration& resolve_target(const std::vector<Registration>& all, const std::string& target,
                                   const std::string& ns, const std::string& container) {
  if (target.empty()) throw Error("empty TARGET");
  std::vector<const Registration*> regs;  // the live ones
  for (const Registration& r : all) {
    if (r.alive) {
      regs.push_back(&r);
    } else if (r.id == target) {
      throw Error("container " + short_id(target) + " is not running (its shim or init is gone; the stale " + r.path +
                  " is removed by the shim's cleanup or at poststop)");
    }
  }
  auto check_container = [&](const Registration& r) -> const Registration& {
    if (!container.empty() && r.container != container)
      throw Error("container " + r.id + " is '" + r.container + "' (pod " + r.ns + "/" + r.pod + "), not '" +
                  container + "'");
    return r;
  };
  // 1. Exact container id.
  for (const Registration* r : regs)
    if (r->id == target) return check_container(*r);

  // 2. Pod name in the namespace.
  std::vector<const Registration*> pod;
  for (const Registration* r : regs)
    if (!r->sandbox && r->ns == ns && r->pod == target) pod.push_back(r);
  if (!pod.empty()) {
    std::string podname = ns + "/" + target;
    if (container.empty()) {
      if (pod.size() == 1) return *pod[0];
      throw Error("pod " + podname + " has " + std::to_string(pod.size()) +
                  " containers, choose one with -c:" + list(pod, true));
    }
    std::vector<const Registration*> named;
    for (const Registration* r : pod)
      if (r->container == container) named.push_back(r);
    if (named.size() == 1) return *named[0];
    if (named.empty())
      throw Error("pod " + podname + " has no container '" + container + "'; its containers:" + list(pod, true));
    throw Error("pod " + podname + " has several containers named '" + container + "':" + list(named));
  }

  // 3. Unique id prefix.
  std::vector<const Registration*> prefixed;
  for (const Registration* r : regs)
    if (r->id.compare(0, target.size(), target) == 0 && (container.empty() || r->container == container))
      prefixed.push_back(r);
  if (prefixed.size() == 1) return *prefixed[0];
  if (prefixed.size() > 1)
    throw Error("'" + target + "' is ambiguous: it prefixes " + std::to_string(prefixed.size()) +
                " container ids:" + list(prefixed));

  std::string msg = "no container matches '" + target +
                    "' (a container id, unique id prefix, or pod name in namespace " + ns +
                    (container.empty() ? "" : ", container " + container) + ")";
  if (regs.empty()) throw Error(msg + "; no containers are registered on this node");
  throw Error(msg + "; " + std::to_string(regs.size()) + " registered:" + list(regs));
}

}  // namespace shimlet::client
