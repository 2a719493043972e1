// Node registration bodies and the registry built from them.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "master/registry.h"
#include "master/registry_memory.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string in(reinterpret_cast<const char*>(data), size);
  try {
    auto r = shimlet::master::parse_registration(in);
    shimlet::master::MemoryRegistry reg(1000);
    reg.put_at("n1", r.id, r, 0, "10.0.0.1");
    reg.entries().pod_list_json("", 1).dump();
    reg.entries().pod_json(r.namespace_, r.pod, 1);
    reg.entries().find(r.namespace_, r.pod, "", 1);
    reg.expire(5000);
  } catch (const shimlet::Error&) {
  }
  return 0;
}
