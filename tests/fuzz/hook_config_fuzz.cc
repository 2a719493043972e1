// Fuzzes the hook config parser (hook::parse_config): any input must either
// parse or throw shimlet::Error, never crash, hang or throw anything else.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "common/error.h"
#include "hook/hook.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  try {
    auto c = shimlet::hook::parse_config(in, "/usr/libexec/shimlet");
    if (c.shim_binary.empty() || c.shim_binary[0] != '/') __builtin_trap();
    if (c.ready_timeout_ms < 1 || c.max_sessions < 1) __builtin_trap();
  } catch (const shimlet::Error&) {
  }
  return 0;
}
