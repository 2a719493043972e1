// Fuzzes shimctl's kubeconfig reader (client::merge_kubeconfig): any input
// must merge or throw shimlet::Error, never crash or throw anything else.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "client/client.h"
#include "common/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  shimlet::client::KubeConfig kc;
  try {
    shimlet::client::merge_kubeconfig(kc, in, "/fuzz/kubeconfig");
  } catch (const shimlet::Error&) {
  }
  return 0;
}
