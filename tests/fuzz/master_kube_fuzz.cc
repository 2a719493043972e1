// kubectl's exec query (.../pods/POD/exec?command=..&stdin=..) as the master
// parses it before minting a ticket, and the relayed request head.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "master/kube.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string q(reinterpret_cast<const char*>(data), size);
  try {
    auto p = shimlet::master::kube::parse_exec_query(q);
    shimlet::master::Request r;
    r.method = "GET";
    r.target = "/x?" + q;
    r.headers = {{"authorization", p.container}};
    shimlet::master::kube::relay_request_head(r, "t");
  } catch (const shimlet::Error&) {
  }
  return 0;
}
