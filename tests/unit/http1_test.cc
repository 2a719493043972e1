// The shared bounded HTTP/1.1 request reader (proto/http1.h) in both modes
// (the shim's head-only front door, the master's whole pipelined requests),
// and the shim front door's pure parts built on it (session/session_http1.h).
#include "proto/http1.h"

#include <gtest/gtest.h>

#include "session/session_http1.h"

using namespace shimlet::session::http1;
using shimlet::proto::http1::Limits;
using shimlet::proto::http1::Mode;
using State = RequestReader::State;

namespace {

Request parse(const std::string& head) {
  RequestReader r(kDoorLimits);
  EXPECT_EQ(r.feed(head.data(), head.size()), State::Done) << r.error();
  return r.request();
}

// Mode::Messages with every request collected.
struct Collected {
  std::vector<Request> reqs;
  std::unique_ptr<RequestReader> reader;
  explicit Collected(Limits l = {}) {
    reader = std::make_unique<RequestReader>(l, Mode::Messages, [this](Request&& r) { reqs.push_back(std::move(r)); });
  }
  State feed(const std::string& s) { return reader->feed(s.data(), s.size()); }
};

}  // namespace

// ---------------------------------------------------------------- HeadOnly

TEST(Http1HeadOnly, ReadsOneHeadAndLeavesTheRest) {
  std::string head = "GET /exec/tok?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
  std::string all = head + "\x82\x05hello";
  RequestReader r(kDoorLimits);
  // Byte by byte, as a slow client would send it.
  size_t used = 0;
  for (size_t i = 0; i < all.size() && r.state() == State::Incomplete; i++) {
    r.feed(all.data() + i, 1);
    used += r.consumed();
  }
  ASSERT_EQ(r.state(), State::Done);
  EXPECT_EQ(used, head.size());
  EXPECT_EQ(r.request().method, "GET");
  EXPECT_EQ(r.request().target, "/exec/tok?x=1");
  EXPECT_EQ(r.request().path, "/exec/tok");
  EXPECT_EQ(r.request().query, "x=1");
  EXPECT_EQ(r.request().header("upgrade"), "websocket");
  EXPECT_EQ(r.request().header("host"), "a");
  EXPECT_FALSE(r.request().header("nope"));
  // Done is final: nothing more is taken.
  EXPECT_EQ(r.feed("GET / HTTP/1.1\r\n\r\n", 18), State::Done);
  EXPECT_EQ(r.consumed(), 0u);
}

TEST(Http1HeadOnly, WholeBufferLeavesTheTail) {
  std::string head =
      "POST /api/v1/namespaces/ns/pods/p/exec HTTP/1.1\r\nCONNECTION: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
      "Content-Length: 4\r\n\r\n";
  std::string all = head + "\x80\x03\x00\x01rest";
  RequestReader r(kDoorLimits);
  ASSERT_EQ(r.feed(all.data(), all.size()), State::Done) << r.error();
  EXPECT_EQ(all.substr(r.consumed()), "\x80\x03\x00\x01rest");  // the body is not read
  EXPECT_TRUE(r.request().upgrade);
  EXPECT_FALSE(r.request().keep_alive);
  EXPECT_EQ(r.request().header("connection"), "Upgrade");  // names lower-cased, values as sent
  EXPECT_TRUE(r.request().body.empty());
}

TEST(Http1HeadOnly, Bounds) {
  RequestReader r(kDoorLimits);
  std::string big = "GET /" + std::string(70000, 'a') + " HTTP/1.1\r\n\r\n";
  EXPECT_EQ(r.feed(big.data(), big.size()), State::Error);
  EXPECT_EQ(r.error_status(), 414);
  EXPECT_EQ(r.error(), "request URI too long");
  RequestReader r2(kDoorLimits);
  std::string many = "GET / HTTP/1.1\r\n";
  for (int i = 0; i < 100; i++) many += "X-" + std::to_string(i) + ": v\r\n";
  many += "\r\n";
  EXPECT_EQ(r2.feed(many.data(), many.size()), State::Error);
  EXPECT_EQ(r2.error_status(), 431);
  EXPECT_EQ(r2.error(), "too many request headers");
  RequestReader r3(kDoorLimits);
  std::string junk("\x00\x01garbage\r\n\r\n", 13);
  EXPECT_EQ(r3.feed(junk.data(), junk.size()), State::Error);
  EXPECT_EQ(r3.error_status(), 400);
  EXPECT_NE(r3.error().find("malformed HTTP/1.1 request"), std::string::npos);
  // Errors are final.
  EXPECT_EQ(r3.feed("GET / HTTP/1.1\r\n\r\n", 18), State::Error);
  EXPECT_EQ(r3.consumed(), 0u);
  // A ticket-sized Authorization header fits the door's bounds.
  std::string tok = "GET / HTTP/1.1\r\nAuthorization: Bearer " + std::string(60000, 't') + "\r\n\r\n";
  RequestReader r4(kDoorLimits);
  EXPECT_EQ(r4.feed(tok.data(), tok.size()), State::Done) << r4.error();
}

TEST(Http1HeadOnly, HeaderLineBound) {
  Limits l;
  l.max_head_bytes = 1000;
  l.max_header_line_bytes = 40;
  std::string ok = "GET / HTTP/1.1\r\nX-A: " + std::string(30, 'a') + "\r\nX-B: " + std::string(30, 'b') + "\r\n\r\n";
  RequestReader r(l);
  EXPECT_EQ(r.feed(ok.data(), ok.size()), State::Done) << r.error();
  std::string longv = "GET / HTTP/1.1\r\nX-A: " + std::string(40, 'a') + "\r\n\r\n";
  RequestReader r2(l);
  // Fed in pieces: the bound holds across callback fragments.
  EXPECT_EQ(r2.feed(longv.data(), 25), State::Incomplete);
  EXPECT_EQ(r2.feed(longv.data() + 25, longv.size() - 25), State::Error);
  EXPECT_EQ(r2.error_status(), 431);
  EXPECT_EQ(r2.error(), "request header line too long");
  std::string longn = "GET / HTTP/1.1\r\n" + std::string(41, 'n') + ": v\r\n\r\n";
  RequestReader r3(l);
  EXPECT_EQ(r3.feed(longn.data(), longn.size()), State::Error);
  EXPECT_EQ(r3.error_status(), 431);
}

TEST(Http1HeadOnly, EmptyFeedChangesNothing) {
  RequestReader r(kDoorLimits);
  EXPECT_EQ(r.feed("GET / HTTP/1.1\r\n", 16), State::Incomplete);
  EXPECT_EQ(r.feed("", 0), State::Incomplete);  // not end of stream
  EXPECT_EQ(r.consumed(), 0u);
  EXPECT_EQ(r.feed("\r\n", 2), State::Done) << r.error();
}

TEST(Http1Request, HeaderList) {
  Request r = parse("GET / HTTP/1.1\r\nConnection: keep-alive, ,Upgrade \r\nConnection: x\r\n\r\n");
  EXPECT_EQ(r.header_list("connection"), (std::vector<std::string>{"keep-alive", "Upgrade", "x"}));
  EXPECT_TRUE(r.header_list("none").empty());
}

// ---------------------------------------------------------------- Messages

TEST(Http1Messages, ParsesPipelinedRequestsByteByByte) {
  Collected c;
  std::string in =
      "PUT /apis/x?a=1&b=%20c HTTP/1.1\r\nHost: h\r\nX-Multi: a\r\nContent-Length: 5\r\n\r\nhello"
      "POST /y HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
  for (char ch : in) {
    ASSERT_NE(c.reader->feed(&ch, 1), State::Error) << c.reader->error();
    EXPECT_EQ(c.reader->consumed(), 1u);
  }
  EXPECT_EQ(c.reader->state(), State::Incomplete);  // ready for more
  EXPECT_FALSE(c.reader->in_request());
  ASSERT_EQ(c.reqs.size(), 2u);
  EXPECT_EQ(c.reqs[0].method, "PUT");
  EXPECT_EQ(c.reqs[0].path, "/apis/x");
  EXPECT_EQ(c.reqs[0].query, "a=1&b=%20c");
  EXPECT_EQ(c.reqs[0].header("x-multi"), "a");
  EXPECT_EQ(c.reqs[0].body, "hello");
  EXPECT_TRUE(c.reqs[0].keep_alive);
  EXPECT_EQ(c.reqs[1].body, "abc");  // de-chunked
  EXPECT_FALSE(c.reqs[1].keep_alive);
}

TEST(Http1Messages, InRequestWhilePartial) {
  Collected c;
  EXPECT_EQ(c.feed("GET / HTTP/1.1\r\nHo"), State::Incomplete);
  EXPECT_TRUE(c.reader->in_request());
  EXPECT_EQ(c.feed("st: x\r\n\r\n"), State::Incomplete);
  EXPECT_FALSE(c.reader->in_request());
  ASSERT_EQ(c.reqs.size(), 1u);
  EXPECT_TRUE(c.reqs[0].keep_alive);  // HTTP/1.1 default
}

TEST(Http1Messages, Limits) {
  Limits l;
  l.max_head_bytes = 100;
  l.max_header_line_bytes = 100;
  l.max_body_bytes = 10;
  l.max_headers = 3;
  {
    Collected c(l);
    EXPECT_EQ(c.feed("GET / HTTP/1.1\r\nX: " + std::string(200, 'a') + "\r\n\r\n"), State::Error);
    EXPECT_EQ(c.reader->error_status(), 431);
    EXPECT_EQ(c.reader->error(), "request headers too large");
  }
  {
    Collected c(l);
    EXPECT_EQ(c.feed("GET /" + std::string(200, 'a') + " HTTP/1.1\r\n\r\n"), State::Error);
    EXPECT_EQ(c.reader->error_status(), 414);
  }
  {
    Collected c(l);
    EXPECT_EQ(c.feed("GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\n\r\n"), State::Error);
    EXPECT_EQ(c.reader->error_status(), 431);
  }
  {
    Collected c(l);
    EXPECT_EQ(c.feed("PUT / HTTP/1.1\r\nContent-Length: 11\r\n\r\n"), State::Error);
    EXPECT_EQ(c.reader->error_status(), 413);
    EXPECT_EQ(c.reader->error(), "request body too large");
  }
  {
    Collected c(l);
    EXPECT_EQ(c.feed("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n"),
              State::Error);
    EXPECT_EQ(c.reader->error_status(), 413);
    EXPECT_TRUE(c.reqs.empty());
  }
  {
    Collected c(l);
    EXPECT_EQ(c.feed("PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"), State::Incomplete);
    ASSERT_EQ(c.reqs.size(), 1u);  // exactly at the bound
    EXPECT_EQ(c.reqs[0].body, "0123456789");
  }
  {
    Collected c(l);
    EXPECT_EQ(c.feed("GARBAGE\r\n\r\n"), State::Error);
    EXPECT_EQ(c.reader->error_status(), 400);
    EXPECT_EQ(c.feed("GET / HTTP/1.1\r\n\r\n"), State::Error);  // stays failed
    EXPECT_TRUE(c.reqs.empty());
  }
}

TEST(Http1Messages, UpgradeHandedOutThenStops) {
  Collected c;
  std::string in = "GET /exec HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
  EXPECT_EQ(c.feed(in), State::Done);
  ASSERT_EQ(c.reqs.size(), 1u);
  EXPECT_TRUE(c.reqs[0].upgrade);
  EXPECT_FALSE(c.reqs[0].keep_alive);
  // The bytes after the head belong to the upgraded protocol (the master
  // leaves them for the connection's new owner).
  EXPECT_EQ(in.substr(c.reader->consumed()), "\x81\x05hello");
  EXPECT_EQ(c.feed("x"), State::Done);
  EXPECT_EQ(c.reader->consumed(), 0u);
}

TEST(Http1Messages, PipelinedThenUpgrade) {
  Collected c;
  std::string in =
      "GET /a HTTP/1.1\r\n\r\n"
      "CONNECT h:1 HTTP/1.1\r\n\r\nTUNNEL";
  EXPECT_EQ(c.feed(in), State::Done);
  ASSERT_EQ(c.reqs.size(), 2u);
  EXPECT_FALSE(c.reqs[0].upgrade);
  EXPECT_EQ(c.reqs[1].method, "CONNECT");
  EXPECT_TRUE(c.reqs[1].upgrade);
  EXPECT_EQ(in.substr(c.reader->consumed()), "TUNNEL");
}

// ---------------------------------------------------------------- the shim front door's pure parts

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
