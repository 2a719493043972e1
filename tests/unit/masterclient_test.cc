// masterclient: URL parsing, the HTTP/1.1 response parser and Status messages.
// (Real TLS requests to a real master: tests/integration/test_master_e2e.py.)
#include "masterclient/masterclient.h"

#include <gtest/gtest.h>

#include <string>

#include "common/error.h"

using namespace shimlet;
using namespace shimlet::masterclient;

TEST(MasterClientUrl, Forms) {
  Url u = parse_url("https://127.0.0.1:6443");
  EXPECT_EQ(u.host, "127.0.0.1");
  EXPECT_EQ(u.port, 6443);
  EXPECT_EQ(u.prefix, "");
  u = parse_url("https://master.example/prefix/");
  EXPECT_EQ(u.host, "master.example");
  EXPECT_EQ(u.port, 443);
  EXPECT_EQ(u.prefix, "/prefix");
  u = parse_url("https://[::1]:8443");
  EXPECT_EQ(u.host, "::1");
  EXPECT_EQ(u.port, 8443);
  for (const char* bad : {"http://127.0.0.1:6443", "https://", "https://:6443", "https://h:0", "https://h:70000",
                          "https://h:", "https://u@h", "https://h?x=1", "https://h#f", "https://::1:6443",
                          "https://[::1", "https://[nothex]:1", "127.0.0.1:6443"})
    EXPECT_THROW(parse_url(bad), Error) << bad;
}

TEST(MasterClientUrl, PathSegmentIsEncoded) {
  EXPECT_EQ(path_segment("web-1"), "web-1");
  EXPECT_EQ(path_segment("a/b c"), "a%2Fb%20c");
  EXPECT_EQ(path_segment(".."), "..");  // the master refuses such names itself
}

namespace {
Response parse_all(const std::string& in, size_t split, bool* ok) {
  ResponseParser p;
  *ok = p.feed(in.data(), split) && p.feed(in.data() + split, in.size() - split);
  if (*ok && !p.done()) *ok = p.feed(nullptr, 0);
  return p.response();
}
}  // namespace

TEST(MasterClientResponse, ContentLengthChunkedAndEof) {
  const std::string cl = "HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello";
  const std::string ch = "HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
  const std::string eof = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil eof";
  for (size_t split = 1; split < 40; split += 7) {  // (a 0-byte feed means EOF)
    bool ok = false;
    Response r = parse_all(cl, split, &ok);
    EXPECT_TRUE(ok);
    EXPECT_EQ(r.status, 201);
    EXPECT_EQ(r.body, "hello");
    r = parse_all(ch, split, &ok);
    EXPECT_TRUE(ok);
    EXPECT_EQ(r.status, 403);
    EXPECT_EQ(r.body, "abcde");
    r = parse_all(eof, split, &ok);
    EXPECT_TRUE(ok);
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.body, "until eof");
  }
}

TEST(MasterClientResponse, RefusesGarbageTruncationAndOversize) {
  ResponseParser a;
  EXPECT_FALSE(a.feed("NOT HTTP\r\n\r\n", 12));
  EXPECT_FALSE(a.error().empty());
  ResponseParser b;
  std::string cut = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
  EXPECT_TRUE(b.feed(cut.data(), cut.size()));
  EXPECT_FALSE(b.feed(nullptr, 0));
  EXPECT_NE(b.error().find("closed"), std::string::npos);
  ResponseParser c;
  std::string big = "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(kMaxResponseBody + 1) + "\r\n\r\n";
  EXPECT_TRUE(c.feed(big.data(), big.size()));
  std::string chunk(64 * 1024, 'x');
  bool ok = true;
  for (size_t sent = 0; ok && sent <= kMaxResponseBody; sent += chunk.size()) ok = c.feed(chunk.data(), chunk.size());
  EXPECT_FALSE(ok);
  EXPECT_NE(c.error().find("exceeds"), std::string::npos);
  ResponseParser d;
  std::string hdr = "HTTP/1.1 200 OK\r\nX: " + std::string(kMaxResponseHeaders + 1, 'a') + "\r\n\r\n";
  EXPECT_FALSE(d.feed(hdr.data(), hdr.size()));
}

TEST(MasterClientResponse, ErrorMessage) {
  EXPECT_EQ(error_message({403, R"({"kind":"Status","message":"pods \"p\" is forbidden:\nno"})"}),
            "pods \"p\" is forbidden: no");
  EXPECT_EQ(error_message({502, "<html>bad gateway</html>"}), "the master answered HTTP 502");
  EXPECT_EQ(error_message({500, R"({"message":""})"}), "the master answered HTTP 500");
  EXPECT_LE(error_message({400, R"({"message":")" + std::string(5000, 'm') + "\"}"}).size(), 1024u);
}
