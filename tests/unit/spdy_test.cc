// SPDY/3.1 framing: frames built by hand here (with zlib used directly for the
// header blocks, independently of proto/spdy.cc's codec) are fed to the
// server connection, and its output is decoded by hand.
#include "proto/spdy.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <map>
#include <string>
#include <vector>

#include "common/error.h"

using namespace shimlet::proto::spdy;

namespace {

std::string u32(uint32_t v) {
  return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                     static_cast<char>(v)};
}
uint32_t rd32(const std::string& s, size_t off) {
  auto b = [&](size_t i) { return static_cast<uint32_t>(static_cast<uint8_t>(s[off + i])); };
  return b(0) << 24 | b(1) << 16 | b(2) << 8 | b(3);
}

// The client side of the header compression, written against zlib directly.
struct ClientZ {
  z_stream def{}, inf{};
  ClientZ() {
    EXPECT_EQ(deflateInit(&def, 9), Z_OK);
    const std::string& d = dictionary();
    EXPECT_EQ(deflateSetDictionary(&def, reinterpret_cast<const Bytef*>(d.data()), d.size()), Z_OK);
    EXPECT_EQ(inflateInit(&inf), Z_OK);
  }
  ~ClientZ() {
    deflateEnd(&def);
    inflateEnd(&inf);
  }
  std::string deflate_raw(const std::string& plain) {
    std::string out(plain.size() + 1024, '\0');
    def.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(plain.data()));
    def.avail_in = plain.size();
    def.next_out = reinterpret_cast<Bytef*>(out.data());
    def.avail_out = out.size();
    EXPECT_EQ(deflate(&def, Z_SYNC_FLUSH), Z_OK);
    out.resize(out.size() - def.avail_out);
    return out;
  }
  std::string inflate_block(const std::string& comp) {
    std::string out(1 << 16, '\0');
    inf.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(comp.data()));
    inf.avail_in = comp.size();
    inf.next_out = reinterpret_cast<Bytef*>(out.data());
    inf.avail_out = out.size();
    int r = inflate(&inf, Z_SYNC_FLUSH);
    if (r == Z_NEED_DICT) {
      const std::string& d = dictionary();
      EXPECT_EQ(inflateSetDictionary(&inf, reinterpret_cast<const Bytef*>(d.data()), d.size()), Z_OK);
      r = inflate(&inf, Z_SYNC_FLUSH);
    }
    EXPECT_EQ(r, Z_OK);
    EXPECT_EQ(inf.avail_in, 0u);
    out.resize(out.size() - inf.avail_out);
    return out;
  }
};

// Hand-encoded header block: u32 count, then u32 length + bytes for each name and value.
std::string block(const std::vector<std::pair<std::string, std::string>>& h) {
  std::string s = u32(h.size());
  for (auto& [k, v] : h) s += u32(k.size()) + k + u32(v.size()) + v;
  return s;
}

std::string control(uint16_t type, uint8_t flags, const std::string& payload) {
  return u32(0x80030000u | type) + u32(static_cast<uint32_t>(flags) << 24 | payload.size()) + payload;
}
std::string syn_stream(ClientZ& z, uint32_t id, const std::vector<std::pair<std::string, std::string>>& h,
                       uint8_t flags = 0) {
  return control(kSynStream, flags, u32(id) + u32(0) + std::string("\0\0", 2) + z.deflate_raw(block(h)));
}
std::string data_frame(uint32_t id, const std::string& d, uint8_t flags = 0) {
  return u32(id) + u32(static_cast<uint32_t>(flags) << 24 | d.size()) + d;
}

struct Rec : ServerConn::Handler {
  std::vector<std::pair<uint32_t, Headers>> syns;
  std::vector<bool> syn_fin;
  std::map<uint32_t, std::string> data;
  std::vector<uint32_t> fins;
  std::vector<std::pair<uint32_t, uint32_t>> resets;
  std::string error;
  void on_syn_stream(uint32_t id, const Headers& h, bool fin) override {
    syns.emplace_back(id, h);
    syn_fin.push_back(fin);
  }
  void on_data(uint32_t id, const uint8_t* d, size_t n) override {
    data[id].append(reinterpret_cast<const char*>(d), n);
  }
  void on_fin(uint32_t id) override { fins.push_back(id); }
  void on_reset(uint32_t id, uint32_t st) override { resets.emplace_back(id, st); }
  void on_error(const std::string& why) override { error = why; }
};

struct Fixture {
  Rec rec;
  std::string out;
  ServerConn conn;
  explicit Fixture(Limits l = {})
      : conn(
            rec, [this](const uint8_t* d, size_t n) { out.append(reinterpret_cast<const char*>(d), n); }, l) {}
  bool feed(const std::string& s) { return conn.feed(reinterpret_cast<const uint8_t*>(s.data()), s.size()); }
};

// Splits the server's output into frames: {control?, type or stream, flags, payload}.
struct OutFrame {
  bool control;
  uint32_t type_or_stream;
  uint8_t flags;
  std::string payload;
};
std::vector<OutFrame> frames(const std::string& s) {
  std::vector<OutFrame> v;
  size_t off = 0;
  while (off + 8 <= s.size()) {
    uint32_t w0 = rd32(s, off), w1 = rd32(s, off + 4);
    size_t len = w1 & 0xffffff;
    EXPECT_LE(off + 8 + len, s.size());
    bool c = w0 & 0x80000000u;
    if (c) {
      EXPECT_EQ((w0 >> 16) & 0x7fff, 3u);
    }
    v.push_back({c, c ? (w0 & 0xffff) : (w0 & 0x7fffffff), static_cast<uint8_t>(w1 >> 24), s.substr(off + 8, len)});
    off += 8 + len;
  }
  EXPECT_EQ(off, s.size());
  return v;
}

}  // namespace

TEST(Spdy, DictionaryMatchesTheSpec) {
  const std::string& d = dictionary();
  EXPECT_EQ(d.size(), 1423u);
  EXPECT_EQ(adler32(1, reinterpret_cast<const Bytef*>(d.data()), d.size()), 0xE3C6A7C2u);
  EXPECT_EQ(d.substr(0, 11), std::string("\0\0\0\x07options", 11));
  EXPECT_EQ(d.substr(d.size() - 6), "enq=0.");
}

TEST(Spdy, HandEncodedSynStreamDataAndReplyRoundTrip) {
  Fixture f;
  ClientZ z;
  std::string in = syn_stream(z, 1, {{"streamtype", "error"}, {"port", "8080"}, {"requestid", "0"}});
  in += syn_stream(z, 3, {{"streamtype", "data"}, {"port", "8080"}, {"requestid", "0"}});
  in += data_frame(3, "hello");
  in += data_frame(3, " world", kFlagFin);
  ASSERT_TRUE(f.feed(in)) << f.rec.error;
  ASSERT_EQ(f.rec.syns.size(), 2u);
  EXPECT_EQ(f.rec.syns[0].first, 1u);
  EXPECT_EQ(*find(f.rec.syns[0].second, "streamtype"), "error");
  EXPECT_EQ(*find(f.rec.syns[1].second, "port"), "8080");
  EXPECT_EQ(f.rec.data[3], "hello world");
  EXPECT_EQ(f.rec.fins, std::vector<uint32_t>{3});

  // Our output, decoded by hand: SYN_REPLY (with a header block the
  // client's independent inflater reads), DATA, FIN.
  f.conn.reply(3, {{"x-test", "yes"}});
  f.conn.data(3, "abc", 3);
  f.conn.fin(3);
  auto fr = frames(f.out);
  ASSERT_EQ(fr.size(), 3u);
  EXPECT_TRUE(fr[0].control);
  EXPECT_EQ(fr[0].type_or_stream, kSynReply);
  EXPECT_EQ(rd32(fr[0].payload, 0), 3u);
  EXPECT_EQ(z.inflate_block(fr[0].payload.substr(4)), block({{"x-test", "yes"}}));
  EXPECT_EQ(f.out.substr(8 + fr[0].payload.size()), std::string("\0\0\0\x03\0\0\0\x03"
                                                                "abc"
                                                                "\0\0\0\x03\x01\0\0\0",
                                                                19));
  EXPECT_FALSE(f.conn.is_open(3));  // both sides finished
  EXPECT_TRUE(f.conn.is_open(1));

  // A second reply shares the compression context (zlib stream per direction).
  f.out.clear();
  f.conn.reply(1);
  fr = frames(f.out);
  ASSERT_EQ(fr.size(), 1u);
  EXPECT_EQ(z.inflate_block(fr[0].payload.substr(4)), block({}));
}

TEST(Spdy, ByteAtATimeFeedingGivesTheSameResult) {
  Fixture f;
  ClientZ z;
  std::string in = syn_stream(z, 1, {{"streamtype", "stdout"}}) + data_frame(1, std::string(1000, 'x'), kFlagFin);
  for (char c : in) ASSERT_TRUE(f.feed(std::string(1, c)));
  ASSERT_EQ(f.rec.syns.size(), 1u);
  EXPECT_EQ(f.rec.data[1], std::string(1000, 'x'));
  EXPECT_EQ(f.rec.fins.size(), 1u);
}

TEST(Spdy, MultiValueHeadersAndSynFin) {
  Fixture f;
  ClientZ z;
  ASSERT_TRUE(f.feed(syn_stream(z, 1, {{"a", std::string("x\0y", 3)}}, kFlagFin)));
  ASSERT_EQ(f.rec.syns.size(), 1u);
  EXPECT_TRUE(f.rec.syn_fin[0]);
  Headers want{{"a", "x"}, {"a", "y"}};
  EXPECT_EQ(f.rec.syns[0].second, want);
}

TEST(Spdy, PingIsEchoedAndSettingsWindowUpdateAccepted) {
  Fixture f;
  ASSERT_TRUE(f.feed(control(kPing, 0, u32(7))));
  EXPECT_EQ(f.out, control(kPing, 0, u32(7)));
  f.out.clear();
  ASSERT_TRUE(f.feed(control(kPing, 0, u32(8))));  // even: an answer to a ping of ours, not echoed
  ASSERT_TRUE(f.feed(control(kSettings, 0, u32(1) + u32(7) + u32(65536))));
  ASSERT_TRUE(f.feed(control(kWindowUpdate, 0, u32(1) + u32(100))));
  EXPECT_EQ(f.out, "");
}

TEST(Spdy, SendsWithoutWaitingForWindowAndReturnsWindow) {
  Fixture f;
  ClientZ z;
  ASSERT_TRUE(f.feed(syn_stream(z, 1, {{"streamtype", "stdout"}})));
  f.conn.reply(1);
  // 1 MiB out with no WINDOW_UPDATE from the peer (spdystream never sends one).
  std::string big(1 << 20, 'z');
  EXPECT_TRUE(f.conn.data(1, big.data(), big.size()));
  size_t payload = 0;
  for (auto& fr : frames(f.out))
    if (!fr.control) payload += fr.payload.size();
  EXPECT_EQ(payload, big.size());
  // Consumed inbound bytes are returned (stream and session windows).
  f.out.clear();
  f.conn.consumed(1, 40000);
  auto fr = frames(f.out);
  ASSERT_EQ(fr.size(), 2u);
  EXPECT_EQ(fr[0].type_or_stream, kWindowUpdate);
  EXPECT_EQ(fr[0].payload, u32(1) + u32(40000));
  EXPECT_EQ(fr[1].payload, u32(0) + u32(40000));
}

TEST(Spdy, ZlibBombIsRefused) {
  Limits l;
  l.max_header_block = 64 << 10;
  Fixture f(l);
  ClientZ z;
  // 16 MiB of header value compresses to ~16 KiB: under the frame limit,
  // far over the decompressed limit.
  std::string in = syn_stream(z, 1, {{"x", std::string(16 << 20, 'a')}});
  ASSERT_LT(in.size(), l.max_control_frame);
  EXPECT_FALSE(f.feed(in));
  EXPECT_NE(f.rec.error.find("decompresses to more than"), std::string::npos) << f.rec.error;
  EXPECT_TRUE(f.rec.syns.empty());
  auto fr = frames(f.out);
  ASSERT_EQ(fr.size(), 1u);
  EXPECT_EQ(fr[0].type_or_stream, kGoAway);
  EXPECT_EQ(rd32(fr[0].payload, 4), static_cast<uint32_t>(kGoAwayProtocolError));
  // Dead connection: later bytes are ignored.
  EXPECT_FALSE(f.feed(control(kPing, 0, u32(1))));
}

TEST(Spdy, FrameLimitsAndBadFrames) {
  {
    Fixture f;
    EXPECT_FALSE(f.feed(u32(0x80030001u) + u32(1u << 20)));  // 1 MiB control frame announced
    EXPECT_NE(f.rec.error.find("exceeds the limit"), std::string::npos);
  }
  {
    Fixture f;
    EXPECT_FALSE(f.feed(u32(1) + u32(16u << 20 | 0)));  // data frame on a never-opened stream
  }
  {
    Fixture f;
    EXPECT_FALSE(f.feed(u32(0x80020001u) + u32(10) + std::string(10, '\0')));  // SPDY/2
    EXPECT_NE(f.rec.error.find("version"), std::string::npos);
  }
  {
    Fixture f;
    ClientZ z;
    ASSERT_TRUE(f.feed(syn_stream(z, 5, {{"a", "b"}})));
    EXPECT_FALSE(f.feed(syn_stream(z, 3, {{"a", "b"}})));  // ids must increase
  }
  {
    Fixture f;
    ClientZ z;
    EXPECT_FALSE(f.feed(syn_stream(z, 2, {{"a", "b"}})));  // even id from a client
  }
  {
    Fixture f;
    ClientZ z;
    EXPECT_FALSE(f.feed(syn_stream(z, 1, {{"A", "b"}})));  // uppercase name
  }
  {
    Fixture f;  // a header block that is not zlib at all
    EXPECT_FALSE(f.feed(control(kSynStream, 0, u32(1) + u32(0) + std::string("\0\0garbage!", 10))));
  }
  {
    Fixture f;  // malformed control frames of every kind
    EXPECT_FALSE(f.feed(control(kPing, 0, "abc")));
  }
  {
    Fixture f;
    EXPECT_FALSE(f.feed(control(kSettings, 0, u32(3) + u32(0))));
  }
  {
    Fixture f;  // unknown control frame types are ignored
    EXPECT_TRUE(f.feed(control(5, 0, "") + control(10, 0, "xyz")));
  }
}

TEST(Spdy, MaxStreamsRefusesAndResetsAreHandled) {
  Limits l;
  l.max_streams = 2;
  Fixture f(l);
  ClientZ z;
  // (Built one by one: the header blocks share one zlib stream, in order.)
  std::string in = syn_stream(z, 1, {{"a", "1"}});
  in += syn_stream(z, 3, {{"a", "3"}});
  in += syn_stream(z, 5, {{"a", "5"}});
  ASSERT_TRUE(f.feed(in));
  EXPECT_EQ(f.rec.syns.size(), 2u);
  auto fr = frames(f.out);
  ASSERT_EQ(fr.size(), 1u);
  EXPECT_EQ(fr[0].type_or_stream, kRstStream);
  EXPECT_EQ(fr[0].payload, u32(5) + u32(kRefusedStream));
  // The client resets stream 1: it is gone; late data for it is dropped, not fatal.
  ASSERT_TRUE(f.feed(control(kRstStream, 0, u32(1) + u32(kCancel))));
  ASSERT_EQ(f.rec.resets.size(), 1u);
  EXPECT_FALSE(f.conn.is_open(1));
  ASSERT_TRUE(f.feed(data_frame(1, "late")));
  EXPECT_EQ(f.rec.data.count(1), 0u);
  // Room again: a new stream is accepted.
  ASSERT_TRUE(f.feed(syn_stream(z, 7, {{"a", "7"}})));
  EXPECT_EQ(f.rec.syns.size(), 3u);
  // Data after the client's FIN resets that stream.
  f.out.clear();
  ASSERT_TRUE(f.feed(data_frame(7, "x", kFlagFin) + data_frame(7, "y")));
  fr = frames(f.out);
  ASSERT_EQ(fr.size(), 1u);
  EXPECT_EQ(fr[0].payload, u32(7) + u32(kStreamAlreadyClosed));
}

TEST(Spdy, GoAwayFromClientAndFromUs) {
  Fixture f;
  ClientZ z;
  ASSERT_TRUE(f.feed(syn_stream(z, 1, {{"a", "1"}})));
  f.conn.goaway();
  auto fr = frames(f.out);
  ASSERT_EQ(fr.size(), 1u);
  EXPECT_EQ(fr[0].payload, u32(1) + u32(0));
  // After our GOAWAY new streams are refused.
  f.out.clear();
  ASSERT_TRUE(f.feed(syn_stream(z, 3, {{"a", "3"}})));
  EXPECT_EQ(f.rec.syns.size(), 1u);
  EXPECT_EQ(frames(f.out)[0].payload, u32(3) + u32(kRefusedStream));
  ASSERT_TRUE(f.feed(control(kGoAway, 0, u32(0) + u32(0))));
  EXPECT_TRUE(f.conn.peer_went_away());
}

TEST(Spdy, HeaderCodecRoundTripKeepsState) {
  HeaderDeflater d;
  HeaderInflater i(1 << 16, 100);
  for (int n = 0; n < 50; n++) {
    Headers h{{"streamtype", n % 2 ? "stdout" : "stderr"}, {"n", std::to_string(n)}};
    std::string c = d.compress(h);
    EXPECT_EQ(i.decompress(reinterpret_cast<const uint8_t*>(c.data()), c.size()), h);
  }
  std::string truncated = u32(1) + u32(5);
  EXPECT_THROW(parse_headers(reinterpret_cast<const uint8_t*>(truncated.data()), truncated.size(), 100),
               shimlet::Error);
  std::string many = u32(1000);
  EXPECT_THROW(parse_headers(reinterpret_cast<const uint8_t*>(many.data()), many.size(), 100), shimlet::Error);
}
