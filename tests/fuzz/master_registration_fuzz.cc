// Node registration bodies and the registry built from them.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "master/registry.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string in(reinterpret_cast<const char*>(data), size);
  try {
    auto r = shimlet::master::parse_registration(in);
    shimlet::master::Registry reg(1000);
    reg.put("n1", r.id, r, 0, "10.0.0.1");
    reg.pod_list_json("", 1).dump();
    reg.pod_json(r.namespace_, r.pod, 1);
    reg.find(r.namespace_, r.pod, "", 1);
    reg.expire(5000);
  } catch (const shimlet::Error&) {
  }
  return 0;
}
