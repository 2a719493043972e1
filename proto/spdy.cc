// SPDY/3.1 framing (see spdy.h for why it is written here).
#include "proto/spdy.h"

#include <cstring>

#include "common/error.h"

namespace shimlet::proto::spdy {
namespace {

uint32_t be32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) << 24 | static_cast<uint32_t>(p[1]) << 16 | static_cast<uint32_t>(p[2]) << 8 |
         p[3];
}

void put32(std::string& s, uint32_t v) {
  char b[4] = {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
  s.append(b, 4);
}

std::string build_dictionary() {
  // The SPDY/3 spec's dictionary (section 2.6.10.1): these words, each
  // preceded by its u32 big-endian length, then a run of raw text. Kept as
  // words so it can be read and checked against the spec; a unit test checks
  // the size and adler32 (0xE3C6A7C2) every decoder checks on the wire.
  static const char* const kWords[] = {"options",
                                       "head",
                                       "post",
                                       "put",
                                       "delete",
                                       "trace",
                                       "accept",
                                       "accept-charset",
                                       "accept-encoding",
                                       "accept-language",
                                       "accept-ranges",
                                       "age",
                                       "allow",
                                       "authorization",
                                       "cache-control",
                                       "connection",
                                       "content-base",
                                       "content-encoding",
                                       "content-language",
                                       "content-length",
                                       "content-location",
                                       "content-md5",
                                       "content-range",
                                       "content-type",
                                       "date",
                                       "etag",
                                       "expect",
                                       "expires",
                                       "from",
                                       "host",
                                       "if-match",
                                       "if-modified-since",
                                       "if-none-match",
                                       "if-range",
                                       "if-unmodified-since",
                                       "last-modified",
                                       "location",
                                       "max-forwards",
                                       "pragma",
                                       "proxy-authenticate",
                                       "proxy-authorization",
                                       "range",
                                       "referer",
                                       "retry-after",
                                       "server",
                                       "te",
                                       "trailer",
                                       "transfer-encoding",
                                       "upgrade",
                                       "user-agent",
                                       "vary",
                                       "via",
                                       "warning",
                                       "www-authenticate",
                                       "method",
                                       "get",
                                       "status",
                                       "200 OK",
                                       "version",
                                       "HTTP/1.1",
                                       "url",
                                       "public",
                                       "set-cookie",
                                       "keep-alive",
                                       "origin"};
  static const char kTail[] =
      "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
      "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
      "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
      "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
      "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
      "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";
  std::string d;
  for (const char* w : kWords) {
    put32(d, static_cast<uint32_t>(strlen(w)));
    d += w;
  }
  d.append(kTail, sizeof kTail - 1);
  return d;
}

}  // namespace

const std::string& dictionary() {
  static const std::string d = build_dictionary();
  return d;
}

const std::string* find(const Headers& h, const std::string& name) {
  for (auto& [k, v] : h)
    if (k == name) return &v;
  return nullptr;
}

std::string serialize_headers(const Headers& h) {
  // Same-name pairs are joined with NUL, as the spec requires unique names.
  std::vector<std::pair<std::string, std::string>> merged;
  for (auto& [k, v] : h) {
    bool found = false;
    for (auto& m : merged)
      if (m.first == k) {
        m.second += '\0';
        m.second += v;
        found = true;
      }
    if (!found) merged.emplace_back(k, v);
  }
  std::string s;
  put32(s, static_cast<uint32_t>(merged.size()));
  for (auto& [k, v] : merged) {
    put32(s, static_cast<uint32_t>(k.size()));
    s += k;
    put32(s, static_cast<uint32_t>(v.size()));
    s += v;
  }
  return s;
}

Headers parse_headers(const uint8_t* p, size_t len, size_t max_headers) {
  size_t off = 0;
  auto u32 = [&](const char* what) {
    if (len - off < 4) throw Error(std::string("truncated header block (") + what + ")");
    uint32_t v = be32(p + off);
    off += 4;
    return v;
  };
  auto bytes = [&](uint32_t n, const char* what) {
    if (len - off < n) throw Error(std::string("truncated header block (") + what + ")");
    std::string s(reinterpret_cast<const char*>(p + off), n);
    off += n;
    return s;
  };
  uint32_t count = u32("count");
  if (count > max_headers)
    throw Error("header block has " + std::to_string(count) + " headers (limit " + std::to_string(max_headers) + ")");
  Headers h;
  for (uint32_t i = 0; i < count; i++) {
    std::string name = bytes(u32("name length"), "name");
    if (name.empty()) throw Error("empty header name");
    for (char c : name)
      if ((c >= 'A' && c <= 'Z') || c == '\0') throw Error("header name is not lowercase: " + name);
    for (auto& [k, v] : h)
      if (k == name) throw Error("duplicate header name: " + name);
    std::string value = bytes(u32("value length"), "value");
    size_t start = 0;
    for (;;) {
      size_t nul = value.find('\0', start);
      h.emplace_back(name, value.substr(start, nul == std::string::npos ? std::string::npos : nul - start));
      if (nul == std::string::npos) break;
      start = nul + 1;
      if (h.size() > max_headers) throw Error("too many header values");
    }
  }
  if (off != len) throw Error("trailing bytes after the header block");
  return h;
}

HeaderDeflater::HeaderDeflater() {
  if (deflateInit(&z_, Z_DEFAULT_COMPRESSION) != Z_OK) throw Error("deflateInit failed");
  const std::string& d = dictionary();
  if (deflateSetDictionary(&z_, reinterpret_cast<const Bytef*>(d.data()), static_cast<uInt>(d.size())) != Z_OK) {
    deflateEnd(&z_);
    throw Error("deflateSetDictionary failed");
  }
}

HeaderDeflater::~HeaderDeflater() { deflateEnd(&z_); }

std::string HeaderDeflater::compress(const Headers& h) {
  std::string in = serialize_headers(h);
  std::string out;
  z_.next_in = reinterpret_cast<Bytef*>(in.data());
  z_.avail_in = static_cast<uInt>(in.size());
  char buf[4096];
  do {
    z_.next_out = reinterpret_cast<Bytef*>(buf);
    z_.avail_out = sizeof buf;
    int r = deflate(&z_, Z_SYNC_FLUSH);
    if (r != Z_OK && r != Z_BUF_ERROR) throw Error("deflate failed: " + std::to_string(r));
    out.append(buf, sizeof buf - z_.avail_out);
  } while (z_.avail_out == 0);
  return out;
}

HeaderInflater::HeaderInflater(size_t max_out, size_t max_headers) : max_out_(max_out), max_headers_(max_headers) {
  if (inflateInit(&z_) != Z_OK) throw Error("inflateInit failed");
}

HeaderInflater::~HeaderInflater() { inflateEnd(&z_); }

Headers HeaderInflater::decompress(const uint8_t* data, size_t len) {
  std::string out;
  z_.next_in = const_cast<Bytef*>(data);
  z_.avail_in = static_cast<uInt>(len);
  char buf[4096];
  for (;;) {
    z_.next_out = reinterpret_cast<Bytef*>(buf);
    z_.avail_out = sizeof buf;
    int r = inflate(&z_, Z_SYNC_FLUSH);
    if (r == Z_NEED_DICT) {
      const std::string& d = dictionary();
      if (inflateSetDictionary(&z_, reinterpret_cast<const Bytef*>(d.data()), static_cast<uInt>(d.size())) != Z_OK)
        throw Error("header block needs an unknown zlib dictionary");
      continue;
    }
    if (r == Z_STREAM_END) throw Error("header block ended the zlib stream");
    if (r != Z_OK && r != Z_BUF_ERROR)
      throw Error(std::string("bad header block compression: ") + (z_.msg ? z_.msg : "?"));
    size_t produced = sizeof buf - z_.avail_out;
    // Checked per chunk, so a bomb never costs more than the limit + 4 KiB.
    if (out.size() + produced > max_out_)
      throw Error("header block decompresses to more than " + std::to_string(max_out_) + " bytes");
    out.append(buf, produced);
    if (z_.avail_in == 0 && z_.avail_out != 0) break;  // input used up and output drained
    if (r == Z_BUF_ERROR) break;                       // no progress possible
  }
  if (z_.avail_in != 0) throw Error("header block has trailing compressed bytes");
  return parse_headers(reinterpret_cast<const uint8_t*>(out.data()), out.size(), max_headers_);
}

ServerConn::ServerConn(Handler& handler, Output out, Limits limits)
    : h_(handler), out_(std::move(out)), lim_(limits), inflater_(limits.max_header_block, limits.max_headers) {}

void ServerConn::emit(const std::string& frame) {
  bytes_out_ += frame.size();
  out_(reinterpret_cast<const uint8_t*>(frame.data()), frame.size());
}

std::string ServerConn::control_header(uint16_t type, uint8_t flags, size_t len) const {
  std::string s;
  put32(s, 0x80000000u | static_cast<uint32_t>(kVersion) << 16 | type);
  put32(s, static_cast<uint32_t>(flags) << 24 | static_cast<uint32_t>(len));
  return s;
}

void ServerConn::fail(const std::string& why) {
  if (failed_) return;
  failed_ = true;
  if (!sent_goaway_) goaway(kGoAwayProtocolError);
  h_.on_error(why);
}

bool ServerConn::feed(const uint8_t* data, size_t len) {
  bytes_in_ += len;
  size_t off = 0;
  while (off < len && !failed_) {
    if (!in_payload_) {
      size_t take = std::min(kFrameHeader - hdr_.size(), len - off);
      hdr_.append(reinterpret_cast<const char*>(data + off), take);
      off += take;
      if (hdr_.size() < kFrameHeader) break;
      auto* hp = reinterpret_cast<const uint8_t*>(hdr_.data());
      uint32_t w0 = be32(hp), w1 = be32(hp + 4);
      hdr_.clear();
      flags_ = static_cast<uint8_t>(w1 >> 24);
      remaining_ = w1 & 0xffffff;
      is_control_ = w0 & 0x80000000u;
      if (is_control_) {
        c_version_ = static_cast<uint16_t>((w0 >> 16) & 0x7fff);
        c_type_ = static_cast<uint16_t>(w0 & 0xffff);
        if (remaining_ > lim_.max_control_frame) {
          fail("control frame of " + std::to_string(remaining_) + " bytes exceeds the limit of " +
               std::to_string(lim_.max_control_frame));
          break;
        }
        ctrl_.clear();
      } else {
        data_id_ = w0 & 0x7fffffff;
        if (remaining_ > lim_.max_data_frame) {
          fail("data frame of " + std::to_string(remaining_) + " bytes exceeds the limit of " +
               std::to_string(lim_.max_data_frame));
          break;
        }
        if (data_id_ == 0) {
          fail("data frame on stream 0");
          break;
        }
        auto it = streams_.find(data_id_);
        data_deliver_ = false;
        if (it == streams_.end()) {
          // A stream we reset or finished may still see the peer's frames in
          // flight: drop them. A stream never opened is a protocol error.
          if (data_id_ > last_client_id_) {
            fail("data frame on stream " + std::to_string(data_id_) + " that was never opened");
            break;
          }
        } else if (it->second.remote_fin) {
          reset(data_id_, kStreamAlreadyClosed);
        } else {
          data_deliver_ = true;
        }
      }
      in_payload_ = true;
    }
    if (in_payload_) {
      size_t take = std::min(remaining_, len - off);
      if (is_control_) {
        ctrl_.append(reinterpret_cast<const char*>(data + off), take);
      } else if (take > 0) {
        data_chunk(data + off, take);
      }
      off += take;
      remaining_ -= take;
      if (remaining_ == 0 && !failed_) {
        in_payload_ = false;
        if (is_control_) {
          std::string payload = std::move(ctrl_);
          ctrl_.clear();
          control_frame(c_version_, c_type_, flags_, reinterpret_cast<const uint8_t*>(payload.data()), payload.size());
        } else {
          data_end();
        }
      }
    }
  }
  return !failed_;
}

void ServerConn::data_chunk(const uint8_t* p, size_t len) {
  if (!data_deliver_ || !streams_.count(data_id_)) {
    // Dropped bytes still count against the peer's view of our window.
    session_unacked_ += static_cast<uint32_t>(len);
    consumed(0, 0);
    return;
  }
  h_.on_data(data_id_, p, len);
}

void ServerConn::data_end() {
  if (data_deliver_ && (flags_ & kFlagFin) && streams_.count(data_id_)) remote_finished(data_id_);
}

void ServerConn::remote_finished(uint32_t id) {
  auto it = streams_.find(id);
  if (it == streams_.end() || it->second.remote_fin) return;
  it->second.remote_fin = true;
  h_.on_fin(id);
  maybe_forget(id);
}

void ServerConn::maybe_forget(uint32_t id) {
  auto it = streams_.find(id);
  if (it != streams_.end() && it->second.remote_fin && it->second.local_fin) streams_.erase(it);
}

bool ServerConn::local_closed(uint32_t id) const {
  auto it = streams_.find(id);
  return it == streams_.end() || it->second.local_fin;
}

void ServerConn::control_frame(uint16_t version, uint16_t type, uint8_t flags, const uint8_t* p, size_t len) {
  if (version != kVersion) return fail("unsupported SPDY version " + std::to_string(version));
  switch (type) {
    case kSynStream: {
      if (len < 10) return fail("SYN_STREAM too short");
      uint32_t id = be32(p) & 0x7fffffff;
      Headers h;
      // Always inflate: the zlib stream is shared by the whole connection.
      try {
        h = inflater_.decompress(p + 10, len - 10);
      } catch (const Error& e) {
        return fail(std::string("SYN_STREAM: ") + e.what());
      }
      if (id == 0 || id % 2 == 0) return fail("SYN_STREAM with invalid stream id " + std::to_string(id));
      if (id <= last_client_id_) return fail("SYN_STREAM id " + std::to_string(id) + " is not increasing");
      last_client_id_ = id;
      if (sent_goaway_) return reset(id, kRefusedStream);
      if (flags & kFlagUnidirectional) return reset(id, kProtocolError);  // no server push here
      if (streams_.size() >= lim_.max_streams) return reset(id, kRefusedStream);
      bool fin = flags & kFlagFin;
      streams_[id].remote_fin = fin;
      h_.on_syn_stream(id, h, fin);
      return;
    }
    case kRstStream: {
      if (len != 8) return fail("RST_STREAM of wrong length");
      uint32_t id = be32(p) & 0x7fffffff;
      uint32_t status = be32(p + 4);
      if (streams_.erase(id)) h_.on_reset(id, status);
      return;
    }
    case kSettings: {
      if (len < 4) return fail("SETTINGS too short");
      uint32_t n = be32(p);
      if (static_cast<uint64_t>(n) * 8 + 4 != len) return fail("SETTINGS length does not match its count");
      return;  // nothing we act on (windows are not enforced: see spdy.h)
    }
    case kPing: {
      if (len != 4) return fail("PING of wrong length");
      uint32_t id = be32(p);
      if (id % 2 == 1) {  // the client's: echo it; even ids would be answers to ours (we send none)
        std::string f = control_header(kPing, 0, 4);
        put32(f, id);
        emit(f);
      }
      return;
    }
    case kGoAway: {
      if (len != 8) return fail("GOAWAY of wrong length");
      peer_goaway_ = true;
      h_.on_goaway(be32(p) & 0x7fffffff, be32(p + 4));
      return;
    }
    case kHeaders: {
      if (len < 4) return fail("HEADERS too short");
      try {
        inflater_.decompress(p + 4, len - 4);  // keep the zlib stream in step; content unused
      } catch (const Error& e) {
        return fail(std::string("HEADERS: ") + e.what());
      }
      uint32_t id = be32(p) & 0x7fffffff;
      if ((flags & kFlagFin) && streams_.count(id)) remote_finished(id);
      return;
    }
    case kWindowUpdate: {
      if (len != 8) return fail("WINDOW_UPDATE of wrong length");
      return;  // accepted and ignored: we never block on the peer's window (spdy.h)
    }
    case kSynReply:
      return fail("SYN_REPLY from a client");
    default:
      return;  // unknown control frames must be ignored (NOOP, CREDENTIAL, ...)
  }
}

void ServerConn::reply(uint32_t id, const Headers& h, bool fin) {
  auto it = streams_.find(id);
  if (it == streams_.end() || failed_) return;
  std::string block = deflater_.compress(h);
  std::string f = control_header(kSynReply, fin ? kFlagFin : 0, 4 + block.size());
  put32(f, id);
  f += block;
  emit(f);
  if (fin) {
    it->second.local_fin = true;
    maybe_forget(id);
  }
}

bool ServerConn::data(uint32_t id, const void* data, size_t len, bool fin) {
  auto it = streams_.find(id);
  if (it == streams_.end() || it->second.local_fin || failed_) return false;
  auto* p = static_cast<const uint8_t*>(data);
  do {
    size_t n = std::min(len, lim_.send_chunk);
    bool last = n == len;
    std::string f;
    f.reserve(kFrameHeader + n);
    put32(f, id & 0x7fffffff);
    put32(f, static_cast<uint32_t>((fin && last) ? kFlagFin : 0) << 24 | static_cast<uint32_t>(n));
    if (n) f.append(reinterpret_cast<const char*>(p), n);
    emit(f);
    p += n;
    len -= n;
  } while (len > 0);
  if (fin) {
    it->second.local_fin = true;
    maybe_forget(id);
  }
  return true;
}

void ServerConn::reset(uint32_t id, uint32_t status) {
  streams_.erase(id);
  if (failed_ && sent_goaway_) return;
  std::string f = control_header(kRstStream, 0, 8);
  put32(f, id & 0x7fffffff);
  put32(f, status);
  emit(f);
}

void ServerConn::goaway(uint32_t status) {
  if (sent_goaway_) return;
  sent_goaway_ = true;
  std::string f = control_header(kGoAway, 0, 8);
  put32(f, last_client_id_);
  put32(f, status);
  emit(f);
}

void ServerConn::consumed(uint32_t id, size_t len) {
  if (failed_) return;
  // SPDY/3.1 has a per-stream and a session window (stream 0).
  if (id != 0) {
    auto it = streams_.find(id);
    if (it != streams_.end() && !it->second.remote_fin) {
      it->second.unacked += static_cast<uint32_t>(len);
      if (it->second.unacked >= lim_.window_update_threshold) {
        std::string f = control_header(kWindowUpdate, 0, 8);
        put32(f, id);
        put32(f, it->second.unacked);
        emit(f);
        it->second.unacked = 0;
      }
    }
    session_unacked_ += static_cast<uint32_t>(len);
  }
  if (session_unacked_ >= lim_.window_update_threshold) {
    std::string f = control_header(kWindowUpdate, 0, 8);
    put32(f, 0);
    put32(f, session_unacked_);
    emit(f);
    session_unacked_ = 0;
  }
}

}  // namespace shimlet::proto::spdy
