// HTTP/1.1 request parsing (http-parser + our limits), fed in two pieces.
#include <cstddef>
#include <cstdint>
#include <string>

#include "master/http.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  shimlet::master::Limits l;
  l.max_header_bytes = 4096;
  l.max_body_bytes = 4096;
  size_t n = 0;
  shimlet::master::Http1Parser p(l, [&n](shimlet::master::Request&& r, bool) {
    ++n;
    r.query_params();
    r.header("authorization");
  });
  size_t cut = size ? data[0] % (size + 1) : 0;
  const char* d = reinterpret_cast<const char*>(data);
  if (p.feed(d, cut)) p.feed(d + cut, size - cut);
  return 0;
}
