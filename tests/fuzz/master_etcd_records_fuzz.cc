// What the etcd registry reads back from etcd (written by other masters, or
// by anyone with etcd credentials): keys classified, values decoded.
// Input: KEY "\n" VALUE.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "master/etcd_records.h"

namespace er = shimlet::master::etcd_records;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string in(reinterpret_cast<const char*>(data), size);
  size_t nl = in.find('\n');
  std::string key = in.substr(0, nl), value = nl == std::string::npos ? "" : in.substr(nl + 1);
  const std::string prefix = "/shimlet/";
  er::Key k = er::parse_key(prefix, key);
  try {
    switch (k.kind) {
      case er::Kind::Container: {
        auto r = er::decode_container(value, k.name);
        // What decodes must encode back to a record that decodes the same.
        if (er::decode_container(er::encode_container(r), k.name).endpoint != r.endpoint) __builtin_trap();
        break;
      }
      case er::Kind::Node:
        er::encode_node(er::decode_node(value, k.name));
        break;
      case er::Kind::Master:
        er::encode_master(er::decode_master(value, k.name));
        break;
      case er::Kind::Other:
        er::decode_node(value, "n");
        er::decode_master(value, "0");
        break;
    }
  } catch (const shimlet::Error&) {
  }
  return 0;
}
