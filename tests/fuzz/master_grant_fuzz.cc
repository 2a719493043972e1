// exec / port-forward grant request bodies.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "master/grant.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::string in(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    shimlet::master::parse_grant_request((data[0] & 1) ? "exec" : "portforward", in);
  } catch (const shimlet::Error&) {
  }
  return 0;
}
