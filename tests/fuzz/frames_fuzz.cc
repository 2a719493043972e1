// Fuzzes proto::FrameDecoder (the native exec stream framing, decoded by the
// session from a client and by shimctl from a session) and parse_resize.
// The first input byte sets how the rest is cut into feed() calls (as TLS
// records and HTTP/2 DATA chunks cut it). Checks: no frame beyond the payload
// limit, a sticky error stops output, and every input that decodes cleanly
// re-encodes to the bytes it consumed (round trip), whatever the cuts; and
// the zero-copy decode() yields exactly what feed()/next() do.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "proto/frames.h"

using namespace shimlet::proto;

namespace {

std::vector<FrameDecoder::Frame> decode(std::string_view in, size_t step, std::string& error, size_t& left) {
  FrameDecoder d;
  std::vector<FrameDecoder::Frame> out;
  for (size_t i = 0; i < in.size(); i += step) {
    d.feed(in.substr(i, step));
    while (auto f = d.next()) {
      if (f->payload.size() > kMaxFramePayload) abort();
      out.push_back(std::move(*f));
    }
  }
  error = d.error();
  if (!error.empty() && d.next()) abort();  // errors are sticky
  left = d.buffered();
  return out;
}

std::vector<FrameDecoder::Frame> decode_views(std::string_view in, size_t step, std::string& error, size_t& left) {
  FrameDecoder d;
  std::vector<FrameDecoder::Frame> out;
  for (size_t i = 0; i < in.size(); i += step) {
    bool ok = d.decode(in.substr(i, step), [&](FrameType t, std::string_view p) {
      if (p.size() > kMaxFramePayload) abort();
      out.push_back({t, std::string(p)});
      return true;
    });
    if (ok != d.error().empty()) abort();
  }
  error = d.error();
  left = d.buffered();
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  size_t step = static_cast<size_t>(data[0] % 17) + 1;
  std::string_view in(reinterpret_cast<const char*>(data + 1), size - 1);

  std::string err_a, err_b;
  size_t left_a = 0, left_b = 0;
  auto a = decode(in, step, err_a, left_a);
  auto b = decode(in, in.size() ? in.size() : 1, err_b, left_b);  // one feed
  // The cuts must not change what is decoded (after an error the decoder
  // stops taking bytes, so what it holds then depends on the cuts).
  if (a.size() != b.size() || err_a != err_b || (err_a.empty() && left_a != left_b)) abort();
  std::string err_c;
  size_t left_c = 0;
  auto c = decode_views(in, step, err_c, left_c);
  if (c.size() != a.size() || err_c != err_a || (err_a.empty() && left_c != left_a)) abort();
  for (size_t i = 0; i < c.size(); i++)
    if (c[i].type != a[i].type || c[i].payload != a[i].payload) abort();
  std::string re;
  for (size_t i = 0; i < a.size(); i++) {
    if (a[i].type != b[i].type || a[i].payload != b[i].payload) abort();
    append_frame(re, a[i].type, a[i].payload);
    uint16_t cols, rows;
    if (a[i].type == FrameType::Resize && parse_resize(a[i].payload, cols, rows) &&
        resize_payload(cols, rows) != a[i].payload)
      abort();
  }
  if (err_a.empty() && std::string_view(re) != in.substr(0, in.size() - left_a)) abort();
  return 0;
}
