// RBAC YAML manifests (libyaml via common/yaml.h) and the authorizer over whatever parsed.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "master/rbac.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 * 1024) return 0;  // bounded like the policy loader; the master bounds files at 4 MiB
  std::string in(reinterpret_cast<const char*>(data), size);
  shimlet::master::Policy p;
  try {
    p.add_yaml(in, "fuzz");
  } catch (const shimlet::Error&) {
  }
  for (const char* sub : {"", "exec", "portforward"})
    p.authorize({"alice", {"dev", "system:authenticated"}, "create", "", "pods", sub, "dev", "p", ""});
  p.authorize({"system:serviceaccount:ci:runner", {}, "list", "", "pods", "", "", "", ""});
  p.authorize({"prometheus", {"system:authenticated"}, "get", "", "", "", "", "", "/metrics"});  // nonResourceURLs
  return 0;
}
