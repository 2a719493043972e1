// Registrations in the state dir and TARGET resolution (shimctl --local).
#include <dirent.h>
#include <errno.h>
#include <string.h>

#include <algorithm>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "client/client.h"

namespace shimlet::client {
namespace {

constexpr size_t kMaxRegistrationSize = 1 << 20;  // a registration is < 4 KiB; refuse absurd files
constexpr size_t kMaxListed = 10;                 // candidates named in one error line

std::string str_field(const nlohmann::json& j, const char* key, const std::string& path, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) throw Error(path + ": missing \"" + key + "\"");
    return "";
  }
  if (!it->is_string()) throw Error(path + ": \"" + key + "\" is not a string");
  return it->get<std::string>();
}

std::string describe(const Registration& r) {
  return r.id + " (" + r.ns + "/" + r.pod + ", container " + r.container + ")";
}

std::string list(const std::vector<const Registration*>& rs, bool names_only = false) {
  std::string out;
  size_t n = 0;
  for (const Registration* r : rs) {
    if (n == kMaxListed) {
      out += ", ... (" + std::to_string(rs.size() - n) + " more)";
      break;
    }
    if (n++) out += ", ";
    out += names_only ? r->container + " (" + r->id + ")" : describe(*r);
  }
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
  r.ns = str_field(j, "namespace", path, false);
  r.pod = str_field(j, "pod", path, false);
  r.container = str_field(j, "container", path, false);
  if (r.id.empty()) throw Error(path + ": empty \"id\"");
  // Fallbacks as the hook documents them (docs/design.md "State directory").
  if (r.ns.empty()) r.ns = "default";
  if (r.pod.empty()) r.pod = r.id;
  if (r.container.empty()) r.container = r.id;
  if (auto a = j.find("annotations"); a != j.end() && a->is_object()) {
    auto is = [&](const char* k, const char* v) {
      auto it = a->find(k);
      return it != a->end() && it->is_string() && it->get<std::string>() == v;
    };
    r.sandbox = is("io.kubernetes.cri.container-type", "sandbox") || is("io.kubernetes.docker.type", "podsandbox") ||
                is("io.kubernetes.cri-o.ContainerType", "sandbox");
  }
  return r;
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
    std::string path = state_dir + "/" + name + "/registration.json";
    std::ifstream f(path, std::ios::binary);
    if (!f) continue;  // not a container dir, or one being created/removed
    // Chunked read up to the cap: sizing a buffer to the cap up front would
    // zero a megabyte per registration on every shimctl start.
    std::string text;
    char buf[4096];
    while (text.size() <= kMaxRegistrationSize && f.read(buf, sizeof buf).gcount() > 0)
      text.append(buf, static_cast<size_t>(f.gcount()));
    if (text.size() > kMaxRegistrationSize) continue;
    try {
      out.push_back(parse_registration(text, path));
    } catch (const Error&) {
      continue;  // torn down or foreign: never a reason to fail another target
    }
  }
  std::sort(out.begin(), out.end(), [](const Registration& a, const Registration& b) { return a.id < b.id; });
  return out;
}

const Registration& resolve_target(const std::vector<Registration>& regs, const std::string& target,
                                   const std::string& ns, const std::string& container) {
  if (target.empty()) throw Error("empty TARGET");
  auto check_container = [&](const Registration& r) -> const Registration& {
    if (!container.empty() && r.container != container)
      throw Error("container " + r.id + " is '" + r.container + "' (pod " + r.ns + "/" + r.pod + "), not '" +
                  container + "'");
    return r;
  };
  // 1. Exact container id.
  for (const Registration& r : regs)
    if (r.id == target) return check_container(r);

  // 2. Pod name in the namespace.
  std::vector<const Registration*> pod;
  for (const Registration& r : regs)
    if (!r.sandbox && r.ns == ns && r.pod == target) pod.push_back(&r);
  if (!pod.empty()) {
    std::string podname = ns + "/" + target;
    if (container.empty()) {
      if (pod.size() == 1) return *pod[0];
      throw Error("pod " + podname + " has " + std::to_string(pod.size()) +
                  " containers, choose one with -c: " + list(pod, true));
    }
    std::vector<const Registration*> named;
    for (const Registration* r : pod)
      if (r->container == container) named.push_back(r);
    if (named.size() == 1) return *named[0];
    if (named.empty())
      throw Error("pod " + podname + " has no container '" + container + "'; its containers: " + list(pod, true));
    throw Error("pod " + podname + " has several containers named '" + container + "': " + list(named));
  }

  // 3. Unique id prefix.
  std::vector<const Registration*> prefixed;
  for (const Registration& r : regs)
    if (r.id.compare(0, target.size(), target) == 0 && (container.empty() || r.container == container))
      prefixed.push_back(&r);
  if (prefixed.size() == 1) return *prefixed[0];
  if (prefixed.size() > 1)
    throw Error("'" + target + "' is ambiguous: it prefixes " + std::to_string(prefixed.size()) +
                " container ids: " + list(prefixed));

  std::string msg = "no container matches '" + target +
                    "' (a container id, unique id prefix, or pod name in namespace " + ns +
                    (container.empty() ? "" : ", container " + container) + ")";
  if (regs.empty()) throw Error(msg + "; no containers are registered on this node");
  std::vector<const Registration*> all;
  for (const Registration& r : regs) all.push_back(&r);
  throw Error(msg + "; registered: " + list(all));
}

}  // namespace shimlet::client
