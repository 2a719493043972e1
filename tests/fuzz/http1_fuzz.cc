// The shared HTTP/1.1 request reader (proto/http1.h) on untrusted bytes, in
// both modes, fed in two pieces as a socket would: Mode::HeadOnly with the
// shim front door's bounds and pure parts (routing, negotiation, query
// decoding, the WebSocket channel messages after the head), and
// Mode::Messages with small master-like bounds (bodies, pipelining). First
// input byte: where to split.
#include <cstddef>
#include <cstdint>
#include <string>

#include "proto/http1.h"
#include "session/session_http1.h"

using namespace shimlet::session::http1;
using shimlet::proto::http1::Limits;
using shimlet::proto::http1::Mode;
using State = RequestReader::State;

namespace {

void head_only(const uint8_t* data, size_t size, size_t split) {
  RequestReader r(kDoorLimits);
  const char* p = reinterpret_cast<const char*>(data);
  auto st = r.feed(p, split);
  size_t used = r.consumed();
  if (st == State::Incomplete) {
    st = r.feed(p + split, size - split);
    used = split + r.consumed();
  }
  if (used > size) __builtin_trap();
  if (st != State::Done) return;
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

void messages(const uint8_t* data, size_t size, size_t split) {
  Limits l;
  l.max_head_bytes = 4096;
  l.max_header_line_bytes = 1024;
  l.max_body_bytes = 4096;
  size_t n = 0;
  RequestReader r(l, Mode::Messages, [&n](Request&& req) {
    ++n;
    (void)req.header("authorization");
    (void)req.header_list("connection");
    if (req.body.size() > 4096) __builtin_trap();  // the body bound holds
  });
  const char* p = reinterpret_cast<const char*>(data);
  if (r.feed(p, split) == State::Incomplete) r.feed(p + split, size - split);
  if (r.consumed() > size) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  size_t split = data[0];
  data++;
  size--;
  if (split > size) split = size;
  head_only(data, size, split);
  messages(data, size, split);
  return 0;
}
