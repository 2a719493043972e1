// Fuzzes the SPDY/3.1 server connection (proto/spdy.h) with bytes from a
// client: framing, header block inflation (shared zlib stream, SPDY/3
// dictionary, size limits), stream state. The first byte picks how the rest
// is chunked (frame parsing must not depend on read boundaries); the handler
// answers like the shim does (SYN_REPLY, data, FIN, RST) so the output path
// and the stream table are exercised too. Invariants: bounded output per
// input, no stream table growth past max_streams.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/error.h"
#include "proto/spdy.h"

using namespace shimlet::proto::spdy;

namespace {

struct Fuzz : ServerConn::Handler {
  ServerConn* conn = nullptr;
  size_t out = 0;
  void on_syn_stream(uint32_t id, const Headers& h, bool fin) override {
    const std::string* t = find(h, "streamtype");
    if (t && *t == "reset") return conn->reset(id, kRefusedStream);
    conn->reply(id, {{"x", t ? *t : ""}}, false);
    if (fin) conn->fin(id);
  }
  void on_data(uint32_t id, const uint8_t* d, size_t n) override {
    conn->data(id, d, n % 97);  // echo a little
    conn->consumed(id, n);
  }
  void on_fin(uint32_t id) override { conn->fin(id); }
  void on_reset(uint32_t, uint32_t) override {}
  void on_error(const std::string&) override {}
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  size_t chunk = 1 + data[0] % 64;
  data++, size--;
  Fuzz f;
  Limits l;
  l.max_streams = 8;
  l.max_header_block = 16u << 10;
  ServerConn conn(
      f, [&](const uint8_t*, size_t n) { f.out += n; }, l);
  f.conn = &conn;
  for (size_t off = 0; off < size; off += chunk) {
    conn.feed(data + off, std::min(chunk, size - off));
    if (conn.open_streams() > l.max_streams) abort();
  }
  // Output is bounded by what came in (replies and echoes are small).
  if (f.out > 64 * size + 4096) abort();

  // The header block codec on its own, from a fresh stream.
  HeaderInflater inf(16u << 10, 100);
  try {
    inf.decompress(data, size);
  } catch (const shimlet::Error&) {
  }
  try {
    parse_headers(data, size, 100);
  } catch (const shimlet::Error&) {
  }
  return 0;
}
