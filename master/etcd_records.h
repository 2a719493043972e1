// The registry's keys and values in etcd (docs/design.md "Registry in
// etcd"), encoded and decoded. What comes back from etcd was written by other
// masters (or anyone with the etcd credentials): decoding treats it as
// untrusted input, bounded and validated like a registration body (fuzzed:
// tests/fuzz/master_etcd_records_fuzz.cc).
//
//   PREFIX/containers/ID   a container's registration (JSON, registration.json's fields + "node")
//   PREFIX/nodes/NODE      {"node","lease","ttl"}: the node's etcd lease
//   PREFIX/masters/MID     {"id","host","pid","started"}: a live master's heartbeat
//   PREFIX/compact_rev_key the compactor's bookkeeping (not decoded)
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

#include "master/registry.h"

namespace shimlet::master::etcd_records {

// --etcd-prefix as a key prefix: "/shimlet" -> "/shimlet/". Throws
// shimlet::Error for an empty prefix, control characters or more than 256 bytes.
std::string key_prefix(std::string_view flag);

enum class Kind { Container, Node, Master, Other };
struct Key {
  Kind kind = Kind::Other;
  std::string name;  // the container id, node or master id (validated)
};
// Classifies a key read back from etcd; anything unexpected (another
// writer's key, an invalid name) is Kind::Other.
Key parse_key(std::string_view prefix, std::string_view key);

std::string container_key(std::string_view prefix, std::string_view id);
std::string node_key(std::string_view prefix, std::string_view node);
std::string master_key(std::string_view prefix, std::string_view id);
std::string compact_key(std::string_view prefix);

// A container's record: deterministic (sorted keys), so equal registrations
// encode to equal bytes (a renewal that changes nothing writes nothing).
std::string encode_container(const Registration& r);
// Throws shimlet::Error: not a valid registration (parse_registration's
// checks), no node, or an id that is not the key's.
Registration decode_container(std::string_view value, std::string_view id);

struct NodeRecord {
  std::string node;
  int64_t lease = 0;  // etcd lease id (> 0)
  int64_t ttl_s = 0;  // as granted
};
std::string encode_node(const NodeRecord& n);
// Throws shimlet::Error (bad JSON, > 4 KiB, a node other than the key's, lease <= 0).
NodeRecord decode_node(std::string_view value, std::string_view node);

struct MasterRecord {
  std::string id, host, started;
  int64_t pid = 0;
};
std::string encode_master(const MasterRecord& m);
// Throws shimlet::Error (bad JSON, > 4 KiB, an id other than the key's).
MasterRecord decode_master(std::string_view value, std::string_view id);

// Master ids: 1..64 of [0-9a-f].
bool valid_master_id(std::string_view id);

}  // namespace shimlet::master::etcd_records
