// Fuzzes proto::H2FirstRequest, the pre-authentication gate's reader of a
// client's first HTTP/2 request (the preface, frames before the first
// request's HEADERS/CONTINUATION, HPACK as nghttp2 decodes it) with bytes
// from an unauthenticated peer, then its answers: refuse() when a request
// was read, goaway() otherwise. The first byte picks how the rest is chunked
// (parsing must not depend on read boundaries). Invariants: the decoded
// header list stays within its bound, and an answer is a bounded few frames.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "proto/h2_first.h"

using shimlet::proto::H2FirstRequest;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  size_t chunk = 1 + data[0] % 64;
  data++, size--;
  H2FirstRequest r;
  H2FirstRequest::State st = H2FirstRequest::State::Incomplete;
  for (size_t off = 0; off < size && st == H2FirstRequest::State::Incomplete; off += chunk)
    st = r.feed(data + off, std::min(chunk, size - off));
  size_t listed = 0;
  for (auto& [k, v] : r.headers()) listed += k.size() + v.size() + 32;
  if (listed > (128u << 10) + 32 + 64 * 1024) abort();
  std::string out =
      st == H2FirstRequest::State::Request ? r.refuse(403, "application/json", "{\"error\":\"no\"}\n") : r.goaway();
  if (out.size() > 64 * 1024) abort();
  return 0;
}
