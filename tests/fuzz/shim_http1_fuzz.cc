// The shim's Kubernetes front door on untrusted bytes (shim/session_http1.h):
// the HTTP/1.1 request head reader (fed in two pieces, as a socket would),
// routing, protocol negotiation, query decoding, and the WebSocket channel
// messages that follow the head. First input byte: where to split.
#include <cstddef>
#include <cstdint>
#include <string>

#include "shim/session_http1.h"

using namespace shimlet::session::http1;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  size_t split = data[0];
  data++;
  size--;
  if (split > size) split = size;
  RequestReader r;
  const char* p = reinterpret_cast<const char*>(data);
  auto st = r.feed(p, split);
  size_t used = r.consumed();
  if (st == RequestReader::State::Incomplete) {
    st = r.feed(p + split, size - split);
    used = split + r.consumed();
  }
  if (st == RequestReader::State::Done) {
    const Request& req = r.request();
    Route rt = route(req.path);
    (void)loggable_path(req.path);
    if (!rt.status) {
      Negotiation n = negotiate(req, rt.verb);
      if (!n.status && n.transport == Transport::WebSocket) (void)ws_accept(n.ws_key);
    }
    if (auto q = parse_query(req.query))
      for (auto& [k, v] : *q) (void)parse_bool(v);
    // The rest as channel messages of 1..256 bytes (length from the data).
    size_t off = used;
    while (off < size) {
      size_t len = 1 + data[off] % 256;
      off++;
      if (off + len > size) len = size - off;
      (void)decode_channel(data + off, len, true);
      (void)decode_channel(data + off, len, false);
      off += len;
    }
  }
  return 0;
}
