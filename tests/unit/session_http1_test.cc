// The Kubernetes front door's pure parts (shim/session_http1.h).
#include "shim/session_http1.h"

#include <gtest/gtest.h>

using namespace shimlet::session::http1;

namespace {

Request parse(const std::string& head) {
  RequestReader r;
  EXPECT_EQ(r.feed(head.data(), head.size()), RequestReader::State::Done) << r.error();
  return r.request();
}

}  // namespace

TEST(SessionHttp1, ReadsOneHeadAndLeavesTheRest) {
  std::string head = "GET /exec/tok?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
  std::string all = head + "\x82\x05hello";
  RequestReader r;
  // Byte by byte, as a slow client would send it.
  size_t used = 0;
  for (size_t i = 0; i < all.size() && r.state() == RequestReader::State::Incomplete; i++) {
    r.feed(all.data() + i, 1);
    used += r.consumed();
  }
  ASSERT_EQ(r.state(), RequestReader::State::Done);
  EXPECT_EQ(used, head.size());
  EXPECT_EQ(r.request().method, "GET");
  EXPECT_EQ(r.request().path, "/exec/tok");
  EXPECT_EQ(r.request().query, "x=1");
  EXPECT_EQ(r.request().header("upgrade"), "websocket");
  EXPECT_EQ(r.request().header("host"), "a");
}

TEST(SessionHttp1, Bounds) {
  RequestReader r;
  std::string big = "GET /" + std::string(70000, 'a') + " HTTP/1.1\r\n\r\n";
  EXPECT_EQ(r.feed(big.data(), big.size()), RequestReader::State::Error);
  EXPECT_EQ(r.error_status(), 414);
  RequestReader r2;
  std::string many = "GET / HTTP/1.1\r\n";
  for (int i = 0; i < 100; i++) many += "X-" + std::to_string(i) + ": v\r\n";
  many += "\r\n";
  EXPECT_EQ(r2.feed(many.data(), many.size()), RequestReader::State::Error);
  EXPECT_EQ(r2.error_status(), 431);
  RequestReader r3;
  std::string junk("\x00\x01garbage\r\n\r\n", 13);
  EXPECT_EQ(r3.feed(junk.data(), junk.size()), RequestReader::State::Error);
  EXPECT_EQ(r3.error_status(), 400);
  EXPECT_NE(r3.error().find("malformed HTTP/1.1 request"), std::string::npos);
}

TEST(SessionHttp1, Query) {
  auto q = parse_query("command=sh&command=-c&command=echo+a%20b%00c&stdin=true");
  ASSERT_TRUE(q);
  ASSERT_EQ(q->size(), 4u);
  EXPECT_EQ((*q)[2].second, std::string("echo a b\0c", 10));  // %00 kept, not truncated
  EXPECT_FALSE(parse_query("a=%zz"));
  EXPECT_FALSE(parse_query("a=%4"));
  EXPECT_EQ(parse_bool("true"), true);
  EXPECT_EQ(parse_bool("0"), false);
  EXPECT_FALSE(parse_bool("yes"));
}

TEST(SessionHttp1, Routes) {
  auto r = route("/api/v1/namespaces/ns/pods/p/exec");
  EXPECT_EQ(r.status, 0);
  EXPECT_TRUE(r.kube_api);
  EXPECT_EQ(r.verb, Verb::Exec);
  EXPECT_EQ(r.ns, "ns");
  r = route("/portforward/abc.def");
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.verb, Verb::PortForward);
  EXPECT_EQ(r.token, "abc.def");
  EXPECT_EQ(route("/attach/abc").status, 501);
  EXPECT_EQ(route("/api/v1/namespaces/ns/pods/p/attach").status, 501);
  for (const char* p : {"/", "/exec", "/exec/", "/exec/a/b", "/api/v1/namespaces//pods/p/exec", "/v1/exec", "/log/x"})
    EXPECT_EQ(route(p).status, 404) << p;
  EXPECT_EQ(loggable_path("/exec/secret-ticket"), "/exec/<ticket>");
  EXPECT_EQ(route("/exec/a/b").why.find("secret"), std::string::npos);
}

TEST(SessionHttp1, Negotiate) {
  std::string ws =
      "GET /exec/t HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
  auto n = negotiate(parse(ws + "Sec-WebSocket-Protocol: v4.channel.k8s.io, v5.channel.k8s.io\r\n\r\n"), Verb::Exec);
  EXPECT_EQ(n.status, 0) << n.why;
  EXPECT_EQ(n.protocol, "v4.channel.k8s.io");  // the client's first that we serve
  n = negotiate(parse(ws + "Sec-WebSocket-Protocol: v3.channel.k8s.io\r\n\r\n"), Verb::Exec);
  EXPECT_EQ(n.status, 400);
  n = negotiate(parse(ws + "Sec-WebSocket-Protocol: SPDY/3.1+portforward.k8s.io\r\n\r\n"), Verb::PortForward);
  EXPECT_EQ(n.status, 0);
  EXPECT_EQ(n.transport, Transport::WebSocket);
  std::string spdy =
      "POST /exec/t HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
      "X-Stream-Protocol-Version: v5.channel.k8s.io\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n";
  n = negotiate(parse(spdy), Verb::Exec);
  EXPECT_EQ(n.status, 0);
  EXPECT_EQ(n.transport, Transport::Spdy);
  EXPECT_EQ(n.protocol, "v4.channel.k8s.io");
  EXPECT_EQ(negotiate(parse("GET /exec/t HTTP/1.1\r\n\r\n"), Verb::Exec).status, 400);
  // RFC 6455 section 1.3 example.
  EXPECT_EQ(ws_accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

TEST(SessionHttp1, Channels) {
  const uint8_t in[] = {0, 'h', 'i'};
  auto m = decode_channel(in, sizeof in, true);
  EXPECT_EQ(m.kind, ChannelMessage::Kind::Stdin);
  EXPECT_EQ(m.data, "hi");
  std::string rz = std::string("\x04") + R"({"Width":120,"Height":40})";
  m = decode_channel(reinterpret_cast<const uint8_t*>(rz.data()), rz.size(), true);
  ASSERT_EQ(m.kind, ChannelMessage::Kind::Resize);
  EXPECT_EQ(m.cols, 120);
  EXPECT_EQ(m.rows, 40);
  std::string bad = std::string("\x04") + R"({"Width":-1})";
  EXPECT_EQ(decode_channel(reinterpret_cast<const uint8_t*>(bad.data()), bad.size(), true).kind,
            ChannelMessage::Kind::Bad);
  const uint8_t close0[] = {255, 0}, close1[] = {255, 1};
  EXPECT_EQ(decode_channel(close0, 2, true).kind, ChannelMessage::Kind::CloseStdin);
  EXPECT_EQ(decode_channel(close1, 2, true).kind, ChannelMessage::Kind::CloseOther);
  EXPECT_EQ(decode_channel(close0, 2, false).kind, ChannelMessage::Kind::Ignored);  // v4 has no close channel
  EXPECT_EQ(decode_channel(close0, 0, true).kind, ChannelMessage::Kind::Ignored);
}
