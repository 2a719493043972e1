#include "master/registry.h"

#include <algorithm>
#include <tuple>

#include "common/base64.h"
#include "common/error.h"

namespace shimlet::master {
namespace {

using nlohmann::json;
constexpr size_t kMaxRegistration = 64 * 1024;

std::string get_str(const json& j, const char* key, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) throw Error(std::string("registration: missing \"") + key + "\"");
    return "";
  }
  if (!it->is_string()) throw Error(std::string("registration: \"") + key + "\" must be a string");
  return it->get<std::string>();
}

int64_t get_int(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return 0;
  if (!it->is_number_integer()) throw Error(std::string("registration: \"") + key + "\" must be an integer");
  return it->get<int64_t>();
}

// host:port with host a name, IPv4 or [IPv6]; port 1..65535.
bool valid_endpoint(std::string_view ep, std::string* host) {
  size_t colon = ep.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 >= ep.size() || ep.size() > 300) return false;
  std::string_view h = ep.substr(0, colon), p = ep.substr(colon + 1);
  if (p.size() > 5) return false;
  int port = 0;
  for (char c : p) {
    if (c < '0' || c > '9') return false;
    port = port * 10 + (c - '0');
  }
  if (port < 1 || port > 65535) return false;
  if (h.front() == '[') {
    if (h.back() != ']' || h.size() < 3) return false;
    h = h.substr(1, h.size() - 2);
    for (char c : h)
      if (!isxdigit(static_cast<unsigned char>(c)) && c != ':' && c != '.') return false;
  } else {
    for (char c : h)
      if (!isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-') return false;
  }
  if (host) *host = std::string(h);
  return true;
}

}  // namespace

bool valid_id(std::string_view s) {
  if (s.empty() || s.size() > 128 || !isalnum(static_cast<unsigned char>(s[0]))) return false;
  for (char c : s)
    if (!isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.' && c != '-') return false;
  return true;
}

bool valid_name(std::string_view s) {
  if (s.empty() || s.size() > 253 || s == "." || s == "..") return false;
  for (char c : s)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f || c == '/' || c == '?' || c == '#' || c == '%') return false;
  return true;
}

std::optional<std::string> node_of_user(std::string_view user) {
  constexpr std::string_view kPrefix = "system:node:";
  if (user.size() <= kPrefix.size() || user.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  std::string n(user.substr(kPrefix.size()));
  if (!valid_name(n)) return std::nullopt;
  return n;
}

Registration parse_registration(std::string_view text) {
  if (text.size() > kMaxRegistration) throw Error("registration: body too large");
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) throw Error("registration: invalid JSON");
  if (!j.is_object()) throw Error("registration: not a JSON object");
  Registration r;
  r.id = get_str(j, "id", true);
  r.bundle = get_str(j, "bundle", false);
  r.runtime_root = get_str(j, "runtime_root", false);
  r.namespace_ = get_str(j, "namespace", true);
  r.pod = get_str(j, "pod", true);
  r.container = get_str(j, "container", true);
  r.endpoint = get_str(j, "endpoint", true);
  r.pin = get_str(j, "pin", true);
  r.created = get_str(j, "created", false);
  r.node = get_str(j, "node", false);
  r.pid = get_int(j, "pid");
  r.shim_pid = get_int(j, "shim_pid");
  if (!valid_id(r.id)) throw Error("registration: invalid container id");
  if (!valid_name(r.namespace_) || !valid_name(r.pod) || !valid_name(r.container))
    throw Error("registration: invalid namespace, pod or container name");
  if (!r.node.empty() && !valid_name(r.node)) throw Error("registration: invalid node name");
  if (!valid_endpoint(r.endpoint, nullptr)) throw Error("registration: endpoint must be host:port");
  if (r.pin.rfind("sha256/", 0) != 0) throw Error("registration: pin must be sha256/<base64>");
  auto raw = base64_decode(std::string_view(r.pin).substr(7));
  if (!raw || raw->size() != 32) throw Error("registration: pin must be sha256/<base64 of 32 bytes>");
  if (r.created.size() > 64) throw Error("registration: created too long");
  if (r.bundle.size() > 4096 || r.runtime_root.size() > 4096) throw Error("registration: path too long");
  if (auto it = j.find("annotations"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) throw Error("registration: annotations must be an object");
    if (it->size() > 256) throw Error("registration: too many annotations");
    for (auto& [k, v] : it->items()) {
      if (!v.is_string()) throw Error("registration: annotation values must be strings");
      r.annotations[k] = v.get<std::string>();
    }
  }
  return r;
}

std::optional<PutResult> prepare_put(const std::string& node, const std::string& id, Registration& r,
                                     const std::string& peer_ip) {
  if (r.id != id) return PutResult{400, "registration id \"" + r.id + "\" does not match the URL's \"" + id + "\"", 0};
  if (!r.node.empty() && r.node != node)
    return PutResult{403, "node \"" + node + "\" may not register a container of node \"" + r.node + "\"", 0};
  r.node = node;
  std::string host;
  if (valid_endpoint(r.endpoint, &host) && (host == "0.0.0.0" || host == "::" || host.empty()) && !peer_ip.empty()) {
    std::string port = r.endpoint.substr(r.endpoint.rfind(':') + 1);
    r.endpoint = (peer_ip.find(':') != std::string::npos ? "[" + peer_ip + "]" : peer_ip) + ":" + port;
  }
  return std::nullopt;
}

void Entries::upsert(Registration r) {
  std::string id = r.id;
  by_id_[id] = std::move(r);
}

bool Entries::erase(const std::string& id) { return by_id_.erase(id) > 0; }

const Registration* Entries::get(const std::string& id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &it->second;
}

std::optional<std::string> Entries::owner(const std::string& id) const {
  auto it = by_id_.find(id);
  if (it == by_id_.end()) return std::nullopt;
  return it->second.node;
}

std::vector<Registration> Entries::list(const std::string& ns, int64_t now_ms) const {
  std::vector<Registration> out;
  for (const auto& [id, r] : by_id_)
    if (r.expires_ms > now_ms && (ns.empty() || r.namespace_ == ns)) out.push_back(r);
  std::sort(out.begin(), out.end(), [](const Registration& a, const Registration& b) {
    return std::tie(a.namespace_, a.pod, a.registered, a.container, a.id) <
           std::tie(b.namespace_, b.pod, b.registered, b.container, b.id);
  });
  return out;
}

std::vector<Registration> Entries::pod_containers(const std::string& ns, const std::string& pod, int64_t now_ms) const {
  std::vector<Registration> out;
  for (auto& r : list(ns, now_ms))
    if (r.pod == pod) out.push_back(std::move(r));
  return out;
}

Entries::Found Entries::find(const std::string& ns, const std::string& pod, const std::string& container,
                             int64_t now_ms) const {
  auto cs = pod_containers(ns, pod, now_ms);
  if (cs.empty()) return {std::nullopt, 404, "pods \"" + pod + "\" not found"};
  std::string want = container;
  if (want.empty()) {
    for (const auto& c : cs)
      if (auto a = c.annotations.find("kubectl.kubernetes.io/default-container"); a != c.annotations.end()) {
        want = a->second;
        break;
      }
  }
  if (want.empty()) return {cs.front(), 200, ""};
  // The most recent registration wins when a restarted container's old entry
  // still holds its lease.
  const Registration* best = nullptr;
  for (const auto& c : cs)
    if (c.container == want && (!best || c.registered >= best->registered)) best = &c;
  if (!best) return {std::nullopt, 400, "container " + want + " is not valid for pod " + pod};
  return {*best, 200, ""};
}

nlohmann::json Entries::to_pod(const std::vector<Registration>& cs) {
  const Registration& f = cs.front();
  json containers = json::array(), statuses = json::array(), annotations = json::object();
  std::vector<std::string> seen;
  for (const auto& c : cs) {
    if (auto a = c.annotations.find("kubectl.kubernetes.io/default-container"); a != c.annotations.end())
      annotations["kubectl.kubernetes.io/default-container"] = a->second;
    if (std::find(seen.begin(), seen.end(), c.container) != seen.end()) continue;
    seen.push_back(c.container);
    containers.push_back({{"name", c.container}, {"image", ""}});
    json st = {{"name", c.container}, {"containerID", "shimlet://" + c.id},
               {"ready", true},       {"started", true},
               {"restartCount", 0},   {"image", ""},
               {"imageID", ""}};
    st["state"] = {{"running", c.created.empty() ? json::object() : json{{"startedAt", c.created}}}};
    statuses.push_back(st);
  }
  annotations["shimlet.io/node"] = f.node;
  json md = {{"name", f.pod}, {"namespace", f.namespace_}, {"annotations", annotations}};
  if (!f.created.empty()) md["creationTimestamp"] = f.created;
  // A stable uid derived from namespace/pod (kubectl only displays it).
  std::string h = hex_encode(sha256(f.namespace_ + "/" + f.pod)).substr(0, 32);
  md["uid"] =
      h.substr(0, 8) + "-" + h.substr(8, 4) + "-" + h.substr(12, 4) + "-" + h.substr(16, 4) + "-" + h.substr(20);
  return {{"kind", "Pod"},
          {"apiVersion", "v1"},
          {"metadata", md},
          {"spec", {{"nodeName", f.node}, {"containers", containers}}},
          {"status", {{"phase", "Running"}, {"containerStatuses", statuses}}}};
}

nlohmann::json Entries::pod_list_json(const std::string& ns, int64_t now_ms) const {
  json items = json::array();
  auto all = list(ns, now_ms);
  for (size_t i = 0; i < all.size();) {
    size_t j = i;
    while (j < all.size() && all[j].namespace_ == all[i].namespace_ && all[j].pod == all[i].pod) ++j;
    items.push_back(
        to_pod(std::vector<Registration>(all.begin() + static_cast<long>(i), all.begin() + static_cast<long>(j))));
    i = j;
  }
  return {{"kind", "PodList"}, {"apiVersion", "v1"}, {"metadata", {{"resourceVersion", ""}}}, {"items", items}};
}

std::optional<nlohmann::json> Entries::pod_json(const std::string& ns, const std::string& pod, int64_t now_ms) const {
  auto cs = pod_containers(ns, pod, now_ms);
  if (cs.empty()) return std::nullopt;
  return to_pod(cs);
}

}  // namespace shimlet::master
