// Fuzzes oci::parse_config (a bundle's config.json): only shimlet::Error may
// escape, and what parses must satisfy the invariants nsenter relies on.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/error.h"
#include "oci/oci.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shimlet::oci;
  try {
    Config c = parse_config(std::string_view(reinterpret_cast<const char*>(data), size));
    if (c.process.cwd.empty() || c.process.cwd[0] != '/') __builtin_trap();
    for (const auto& r : c.process.rlimits)
      if (r.soft > r.hard) __builtin_trap();
    for (const auto& n : c.process.caps.bounding) (void)capability_from_name(n);
    if (c.seccomp)
      for (const auto& s : c.seccomp->syscalls)
        for (const auto& a : s.args)
          if (a.index > 5) __builtin_trap();
  } catch (const shimlet::Error&) {
  }
  return 0;
}
