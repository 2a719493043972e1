// The pre-authentication gate's pure parts: the table of unauthenticated
// connections (session/preauth.h: bounds, who is dropped, deadlines) and the
// first HTTP/2 request reader (proto/h2_first.h) driven by a real nghttp2
// client session.
#include "session/preauth.h"

#include <arpa/inet.h>
#include <event2/event.h>
#include <gtest/gtest.h>
#include <nghttp2/nghttp2.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "proto/h2.h"
#include "proto/h2_first.h"

using shimlet::proto::H2FirstRequest;
using shimlet::session::PreauthTable;
using Why = PreauthTable::Why;

namespace {

PreauthTable::Limits limits(size_t total, size_t per_source, size_t memory = 1u << 30, int64_t timeout = 5000) {
  PreauthTable::Limits l;
  l.max_total = total;
  l.max_per_source = per_source;
  l.max_memory = memory;
  l.timeout_ms = timeout;
  return l;
}

std::vector<PreauthTable::Id> ids(const std::vector<PreauthTable::Victim>& v) {
  std::vector<PreauthTable::Id> out;
  for (auto& x : v) out.push_back(x.id);
  return out;
}

}  // namespace

TEST(PreauthTable, TheIdlestGoesFirstNeverTheNewcomer) {
  PreauthTable t(limits(3, 100));
  EXPECT_TRUE(t.add(1, "a", 0, 1).empty());
  EXPECT_TRUE(t.add(2, "a", 10, 1).empty());
  EXPECT_TRUE(t.add(3, "b", 20, 1).empty());
  // 1 made progress (a handshake flight) after 2 and 3 last did: 2 is idlest.
  t.progress(1, 30);
  auto v = t.add(4, "c", 40, 1);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].id, 2u);
  EXPECT_EQ(v[0].why, Why::Total);
  EXPECT_FALSE(t.contains(2));
  EXPECT_TRUE(t.contains(4));
  EXPECT_EQ(t.size(), 3u);
  // A flood of newcomers drops the idle ones, and never the one that is
  // busy: 1 keeps making progress between arrivals.
  for (PreauthTable::Id id = 5; id < 50; id++) {
    t.progress(1, static_cast<int64_t>(id) * 100);
    auto d = t.add(id, "flood", static_cast<int64_t>(id) * 100 + 1, 1);
    EXPECT_EQ(d.size(), 1u);
    EXPECT_NE(d[0].id, 1u);
    EXPECT_NE(d[0].id, id);
  }
  EXPECT_TRUE(t.contains(1));
}

TEST(PreauthTable, PerSourceBoundDropsThatSourcesIdlest) {
  PreauthTable t(limits(100, 2));
  t.add(1, "a", 0, 1);
  t.add(2, "b", 1, 1);  // idler than a's second, but another source
  t.add(3, "a", 2, 1);
  auto v = t.add(4, "a", 3, 1);
  ASSERT_EQ(v.size(), 1u);
  EXPECT_EQ(v[0].id, 1u);
  EXPECT_EQ(v[0].why, Why::PerSource);
  EXPECT_TRUE(t.contains(2));
  EXPECT_EQ(t.count("a"), 2u);
  EXPECT_EQ(t.count("b"), 1u);
  t.remove(2);
  EXPECT_EQ(t.count("b"), 0u);
}

TEST(PreauthTable, MemoryIsAccountedAndBounded) {
  PreauthTable t(limits(100, 100, 1000));
  t.add(1, "a", 0, 100);
  t.add(2, "a", 1, 100);
  EXPECT_EQ(t.memory(), 200u);
  // 2 grows (a TLS handshake): 1, the idler, goes.
  auto v = t.set_cost(2, 950);
  EXPECT_EQ(ids(v), std::vector<PreauthTable::Id>{1});
  EXPECT_EQ(v[0].why, Why::Memory);
  EXPECT_EQ(t.memory(), 950u);
  // Alone over the bound: it stays (its own size is capped elsewhere).
  EXPECT_TRUE(t.set_cost(2, 2000).empty());
  // A newcomer makes room by dropping the rest.
  v = t.add(3, "b", 5, 10);
  EXPECT_EQ(ids(v), std::vector<PreauthTable::Id>{2});
  EXPECT_EQ(t.memory(), 10u);
  t.remove(3);
  EXPECT_EQ(t.memory(), 0u);
  EXPECT_EQ(t.size(), 0u);
}

TEST(PreauthTable, DeadlinesCountFromAcceptNotProgress) {
  PreauthTable t(limits(100, 100, 1u << 30, 5000));
  EXPECT_FALSE(t.next_deadline());
  t.add(1, "a", 1000, 1);
  t.add(2, "a", 2000, 1);
  t.progress(1, 5900);  // a slowloris: a byte now and then buys nothing
  EXPECT_EQ(*t.next_deadline(), 6000);
  EXPECT_TRUE(t.expired(5999).empty());
  EXPECT_EQ(t.expired(6000), std::vector<PreauthTable::Id>{1});
  EXPECT_EQ(t.expired(7000), (std::vector<PreauthTable::Id>{1, 2}));
  t.remove(1);
  EXPECT_EQ(*t.next_deadline(), 7000);
  EXPECT_EQ(*t.idlest(), 2u);
}

TEST(PreauthTable, SourceKeys) {
  uint8_t v4[4], v6[16], mapped[16];
  inet_pton(AF_INET, "10.1.2.3", v4);
  inet_pton(AF_INET6, "2001:db8:1:2:3:4:5:6", v6);
  inet_pton(AF_INET6, "::ffff:10.1.2.3", mapped);
  EXPECT_EQ(PreauthTable::source_key(AF_INET, v4), "4:10.1.2.3");
  EXPECT_EQ(PreauthTable::source_key(AF_INET6, mapped), "4:10.1.2.3");
  // One /64 is one source: an attacker owns all of it.
  uint8_t other[16];
  inet_pton(AF_INET6, "2001:db8:1:2:ffff:ffff:ffff:ffff", other);
  EXPECT_EQ(PreauthTable::source_key(AF_INET6, v6), PreauthTable::source_key(AF_INET6, other));
  inet_pton(AF_INET6, "2001:db8:1:3::1", other);
  EXPECT_NE(PreauthTable::source_key(AF_INET6, v6), PreauthTable::source_key(AF_INET6, other));
}

// ---------------------------------------------------------------- H2FirstRequest

namespace {

// A real nghttp2 client: what it sends for one request, and what it makes
// of the server's answer.
struct Client {
  nghttp2_session* s = nullptr;
  int status = 0;
  std::string body;
  uint32_t goaway = 0xffffffff;
  bool closed = false;
  Client() {
    nghttp2_session_callbacks* cbs;
    nghttp2_session_callbacks_new(&cbs);
    nghttp2_session_callbacks_set_on_header_callback(cbs, [](nghttp2_session*, const nghttp2_frame*, const uint8_t* n,
                                                             size_t nl, const uint8_t* v, size_t vl, uint8_t, void* u) {
      if (std::string(reinterpret_cast<const char*>(n), nl) == ":status")
        static_cast<Client*>(u)->status = std::stoi(std::string(reinterpret_cast<const char*>(v), vl));
      return 0;
    });
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
        cbs, [](nghttp2_session*, uint8_t, int32_t, const uint8_t* d, size_t l, void* u) {
          static_cast<Client*>(u)->body.append(reinterpret_cast<const char*>(d), l);
          return 0;
        });
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, [](nghttp2_session*, const nghttp2_frame* f, void* u) {
      if (f->hd.type == NGHTTP2_GOAWAY) static_cast<Client*>(u)->goaway = f->goaway.error_code;
      return 0;
    });
    nghttp2_option* opt;
    nghttp2_option_new(&opt);
    nghttp2_option_set_max_send_header_block_length(opt, 1u << 20);  // it may send what a server must refuse
    nghttp2_session_client_new2(&s, cbs, this, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cbs);
    nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, nullptr, 0);
  }
  ~Client() { nghttp2_session_del(s); }
  void request(std::vector<std::pair<std::string, std::string>> h) {
    std::vector<nghttp2_nv> nv;
    for (auto& [k, v] : h)
      nv.push_back({reinterpret_cast<uint8_t*>(k.data()), reinterpret_cast<uint8_t*>(v.data()), k.size(), v.size(),
                    NGHTTP2_NV_FLAG_NONE});
    ASSERT_GT(nghttp2_submit_request(s, nullptr, nv.data(), nv.size(), nullptr, nullptr), 0);
  }
  std::string out() {
    std::string o;
    const uint8_t* d;
    ssize_t n;
    while ((n = nghttp2_session_mem_send(s, &d)) > 0) o.append(reinterpret_cast<const char*>(d), n);
    return o;
  }
  void in(const std::string& b) {
    ASSERT_EQ(nghttp2_session_mem_recv(s, reinterpret_cast<const uint8_t*>(b.data()), b.size()),
              static_cast<ssize_t>(b.size()));
  }
};

const std::string* find(const shimlet::proto::Headers& h, const std::string& k) {
  return shimlet::proto::find_header(h, k);
}

}  // namespace

TEST(H2FirstRequest, ReadsTheFirstRequestByteByByteAndAnswersIt) {
  Client c;
  c.request({{":method", "POST"},
             {":scheme", "https"},
             {":authority", "x"},
             {":path", "/v1/exec"},
             {"authorization", "Bearer tok"}});
  std::string bytes = c.out();
  H2FirstRequest r;
  for (size_t i = 0; i + 1 < bytes.size(); i++)
    ASSERT_EQ(r.feed(reinterpret_cast<const uint8_t*>(&bytes[i]), 1), H2FirstRequest::State::Incomplete) << i;
  ASSERT_EQ(r.feed(reinterpret_cast<const uint8_t*>(&bytes.back()), 1), H2FirstRequest::State::Request);
  EXPECT_EQ(r.stream(), 1);
  EXPECT_EQ(*find(r.headers(), ":path"), "/v1/exec");
  EXPECT_EQ(*find(r.headers(), "authorization"), "Bearer tok");
  // The refusal is a complete HTTP/2 answer the client understands.
  c.in(r.refuse(401, "application/json", "{\"error\":\"missing ticket\"}\n"));
  EXPECT_EQ(c.status, 401);
  EXPECT_EQ(c.body, "{\"error\":\"missing ticket\"}\n");
  EXPECT_EQ(c.goaway, static_cast<uint32_t>(NGHTTP2_NO_ERROR));
}

TEST(H2FirstRequest, ProtocolErrorsAreNamedAndAnsweredWithGoaway) {
  H2FirstRequest bad_preface;
  std::string junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  EXPECT_EQ(bad_preface.feed(reinterpret_cast<const uint8_t*>(junk.data()), junk.size()), H2FirstRequest::State::Error);
  EXPECT_EQ(bad_preface.error().rfind("HTTP/2 protocol error: ", 0), 0u) << bad_preface.error();

  // DATA on stream 0 after a good preface: a connection error, GOAWAY PROTOCOL_ERROR.
  Client c;
  std::string bytes = c.out();
  bytes += std::string("\x00\x00\x01\x00\x00\x00\x00\x00\x00x", 10);
  H2FirstRequest r;
  EXPECT_EQ(r.feed(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), H2FirstRequest::State::Error);
  EXPECT_NE(r.error().find("PROTOCOL_ERROR"), std::string::npos) << r.error();
  c.in(r.goaway());
  EXPECT_EQ(c.goaway, static_cast<uint32_t>(NGHTTP2_PROTOCOL_ERROR));
}

TEST(H2FirstRequest, BoundedByBytesAndByTheDecodedHeaderList) {
  // HPACK: one 3000-byte header, then many one-byte references to it. The
  // encoded block is small; the decoded list is what is bounded.
  Client c;
  std::vector<std::pair<std::string, std::string>> h = {
      {":method", "POST"}, {":scheme", "https"}, {":authority", "x"}, {":path", "/v1/exec"}};
  for (int i = 0; i < 60; i++) h.push_back({"x-big", std::string(3000, 'a')});
  c.request(h);
  std::string bytes = c.out();
  ASSERT_LT(bytes.size(), 8000u);  // the dynamic table did its job
  H2FirstRequest r;
  EXPECT_EQ(r.feed(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), H2FirstRequest::State::Error);
  EXPECT_NE(r.error().find("header list larger than"), std::string::npos) << r.error();

  // A preface followed by endless WINDOW_UPDATEs: no request within the byte bound.
  Client p;
  std::string pings = p.out();
  H2FirstRequest q;
  std::string ping("\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x01", 13);
  q.feed(reinterpret_cast<const uint8_t*>(pings.data()), pings.size());
  H2FirstRequest::State st = H2FirstRequest::State::Incomplete;
  for (size_t sent = 0; sent < H2FirstRequest::kMaxBytes + 100 && st == H2FirstRequest::State::Incomplete;
       sent += ping.size())
    st = q.feed(reinterpret_cast<const uint8_t*>(ping.data()), ping.size());
  EXPECT_EQ(st, H2FirstRequest::State::Error);
  EXPECT_NE(q.error().find("no request within"), std::string::npos) << q.error();
}

TEST(H2FirstRequest, ServerPrefaceIsTheSessionsFirstFrameByteForByte) {
  // The gate sends the preface; the session's H2Conn, submitting the same
  // SETTINGS, must produce exactly these bytes first (and skips them).
  std::string preface = H2FirstRequest().server_preface();
  ASSERT_EQ(preface.size(), 9u + 4 * 6);
  EXPECT_EQ(preface[3], NGHTTP2_SETTINGS);
  int sp[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sp), 0);
  struct Quiet : shimlet::proto::H2Conn::Handler {
    void on_headers(int32_t, const shimlet::proto::Headers&, bool) override {}
    void on_data(int32_t, const uint8_t*, size_t) override {}
    void on_remote_end(int32_t) override {}
    void on_stream_close(int32_t, uint32_t) override {}
    void on_closed(const std::string&) override {}
  } h;
  event_base* base = event_base_new();
  {
    shimlet::proto::H2Conn conn(base, sp[0], nullptr, shimlet::proto::H2Conn::Role::Server, &h);
    event_base_loop(base, EVLOOP_NONBLOCK);
    char buf[256];
    ssize_t n = read(sp[1], buf, sizeof buf);
    ASSERT_GE(n, static_cast<ssize_t>(preface.size()));
    EXPECT_EQ(std::string(buf, preface.size()), preface);
  }
  event_base_free(base);
  close(sp[1]);
}
