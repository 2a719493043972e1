// Fuzzes the HTTP/1.1 response parser of masterclient (what the hook and
// shimctl read from the network): any bytes, fed in two chunks then EOF, must
// parse or fail cleanly, never crash, hang or exceed the body bound.
#include <cstddef>
#include <cstdint>

#include "masterclient/masterclient.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const char* p = reinterpret_cast<const char*>(data);
  size_t cut = size ? data[0] % (size + 1) : 0;
  shimlet::masterclient::ResponseParser parser;
  if (parser.feed(p, cut) && parser.feed(p + cut, size - cut)) parser.feed(nullptr, 0);
  if (parser.response().body.size() > shimlet::masterclient::kMaxResponseBody) __builtin_trap();
  (void)shimlet::masterclient::error_message(parser.response());
  return 0;
}
