// Fuzzes oci::parse_state (the hook's stdin): only shimlet::Error may escape.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/error.h"
#include "oci/oci.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto s = shimlet::oci::parse_state(std::string_view(reinterpret_cast<const char*>(data), size));
    if (s.id.empty() || s.bundle.empty() || s.bundle[0] != '/' || s.pid < 0) __builtin_trap();
  } catch (const shimlet::Error&) {
  }
  return 0;
}
