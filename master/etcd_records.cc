#include "master/etcd_records.h"

#include <nlohmann/json.hpp>

#include "common/error.h"

namespace shimlet::master::etcd_records {

namespace {

using nlohmann::json;
constexpr size_t kMaxSmallRecord = 4096;
constexpr std::string_view kContainers = "containers/", kNodes = "nodes/", kMasters = "masters/";

json small_object(std::string_view value, const char* what) {
  if (value.size() > kMaxSmallRecord) throw Error(std::string(what) + " record larger than 4 KiB");
  json j = json::parse(value, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw Error(std::string(what) + " record is not a JSON object");
  return j;
}

std::string string_field(const json& j, const char* key, const char* what, size_t max) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) throw Error(std::string(what) + " record: \"" + key + "\" must be a string");
  std::string s = it->get<std::string>();
  if (s.size() > max) throw Error(std::string(what) + " record: \"" + key + "\" too long");
  return s;
}

int64_t int_field(const json& j, const char* key, const char* what) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_integer())
    throw Error(std::string(what) + " record: \"" + key + "\" must be an integer");
  return it->get<int64_t>();
}

}  // namespace

std::string key_prefix(std::string_view flag) {
  std::string p(flag);
  while (!p.empty() && p.back() == '/') p.pop_back();
  if (p.empty()) throw Error("--etcd-prefix must not be empty (or only '/')");
  if (p.size() > 256) throw Error("--etcd-prefix longer than 256 bytes");
  for (unsigned char c : p)
    if (c < 0x20 || c == 0x7f) throw Error("--etcd-prefix contains control characters");
  return p + "/";
}

bool valid_master_id(std::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

Key parse_key(std::string_view prefix, std::string_view key) {
  Key k;
  if (key.size() <= prefix.size() || key.substr(0, prefix.size()) != prefix) return k;
  std::string_view rest = key.substr(prefix.size());
  auto take = [&](std::string_view dir, Kind kind, bool (*valid)(std::string_view)) {
    if (rest.substr(0, dir.size()) != dir) return false;
    std::string_view name = rest.substr(dir.size());
    if (!valid(name)) return false;
    k.kind = kind;
    k.name = std::string(name);
    return true;
  };
  take(kContainers, Kind::Container, valid_id) || take(kNodes, Kind::Node, valid_name) ||
      take(kMasters, Kind::Master, valid_master_id);
  return k;
}

std::string container_key(std::string_view prefix, std::string_view id) {
  return std::string(prefix) + std::string(kContainers) + std::string(id);
}
std::string node_key(std::string_view prefix, std::string_view node) {
  return std::string(prefix) + std::string(kNodes) + std::string(node);
}
std::string master_key(std::string_view prefix, std::string_view id) {
  return std::string(prefix) + std::string(kMasters) + std::string(id);
}
std::string compact_key(std::string_view prefix) { return std::string(prefix) + "compact_rev_key"; }

std::string encode_container(const Registration& r) {
  json ann = json::object();
  for (const auto& [k, v] : r.annotations) ann[k] = v;
  json j = {{"id", r.id},
            {"node", r.node},
            {"namespace", r.namespace_},
            {"pod", r.pod},
            {"container", r.container},
            {"endpoint", r.endpoint},
            {"pin", r.pin},
            {"bundle", r.bundle},
            {"runtime_root", r.runtime_root},
            {"created", r.created},
            {"pid", r.pid},
            {"shim_pid", r.shim_pid},
            {"annotations", ann}};
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

Registration decode_container(std::string_view value, std::string_view id) {
  Registration r = parse_registration(value);
  if (r.node.empty()) throw Error("container record without a node");
  if (r.id != id) throw Error("container record for \"" + r.id + "\" under the key of \"" + std::string(id) + "\"");
  return r;
}

std::string encode_node(const NodeRecord& n) {
  return json{{"node", n.node}, {"lease", n.lease}, {"ttl", n.ttl_s}}.dump();
}

NodeRecord decode_node(std::string_view value, std::string_view node) {
  json j = small_object(value, "node");
  NodeRecord n;
  n.node = string_field(j, "node", "node", 253);
  if (n.node != node) throw Error("node record for \"" + n.node + "\" under another node's key");
  n.lease = int_field(j, "lease", "node");
  if (n.lease <= 0) throw Error("node record: lease must be positive");
  n.ttl_s = int_field(j, "ttl", "node");
  return n;
}

std::string encode_master(const MasterRecord& m) {
  return json{{"id", m.id}, {"host", m.host}, {"pid", m.pid}, {"started", m.started}}.dump(
      -1, ' ', false, json::error_handler_t::replace);
}

MasterRecord decode_master(std::string_view value, std::string_view id) {
  json j = small_object(value, "master");
  MasterRecord m;
  m.id = string_field(j, "id", "master", 64);
  if (m.id != id) throw Error("master record under another master's key");
  m.host = string_field(j, "host", "master", 256);
  m.started = string_field(j, "started", "master", 64);
  m.pid = int_field(j, "pid", "master");
  return m;
}

}  // namespace shimlet::master::etcd_records
