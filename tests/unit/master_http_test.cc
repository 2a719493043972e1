#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "master/http.h"

using namespace shimlet::master;

namespace {
struct Collected {
  std::vector<Request> reqs;
  std::vector<bool> keep;
};
std::unique_ptr<Http1Parser> parser(Collected& c, Limits l = {}) {
  return std::make_unique<Http1Parser>(l, [&c](Request&& r, bool k) {
    c.reqs.push_back(std::move(r));
    c.keep.push_back(k);
  });
}
}  // namespace

TEST(MasterHttp1, ParsesPipelinedRequestsByteByByte) {
  Collected c;
  auto p = parser(c);
  std::string in =
      "PUT /apis/x?a=1&b=%20c HTTP/1.1\r\nHost: h\r\nX-Multi: a\r\nContent-Length: 5\r\n\r\nhello"
      "POST /y HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
  for (char ch : in) ASSERT_TRUE(p->feed(&ch, 1));
  ASSERT_EQ(c.reqs.size(), 2u);
  EXPECT_EQ(c.reqs[0].method, "PUT");
  EXPECT_EQ(c.reqs[0].path, "/apis/x");
  EXPECT_EQ(c.reqs[0].query, "a=1&b=%20c");
  auto q = c.reqs[0].query_params();
  EXPECT_EQ(q.find("b")->second, " c");
  EXPECT_EQ(c.reqs[0].header("x-multi"), "a");
  EXPECT_EQ(c.reqs[0].body, "hello");
  EXPECT_TRUE(c.keep[0]);
  EXPECT_EQ(c.reqs[1].body, "abc");
  EXPECT_FALSE(c.keep[1]);
}

TEST(MasterHttp1, Limits) {
  Limits l;
  l.max_header_bytes = 100;
  l.max_body_bytes = 10;
  l.max_headers = 3;
  {
    Collected c;
    auto p = parser(c, l);
    std::string in = "GET / HTTP/1.1\r\nX: " + std::string(200, 'a') + "\r\n\r\n";
    EXPECT_FALSE(p->feed(in.data(), in.size()));
    EXPECT_EQ(p->error_status(), 431);
  }
  {
    Collected c;
    auto p = parser(c, l);
    std::string in = "GET / HTTP/1.1\r\na: 1\r\nb: 1\r\nc: 1\r\nd: 1\r\n\r\n";
    EXPECT_FALSE(p->feed(in.data(), in.size()));
    EXPECT_EQ(p->error_status(), 431);
  }
  {
    Collected c;
    auto p = parser(c, l);
    std::string in = "PUT / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
    EXPECT_FALSE(p->feed(in.data(), in.size()));
    EXPECT_EQ(p->error_status(), 413);
  }
  {
    Collected c;
    auto p = parser(c, l);
    std::string in = "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n";
    EXPECT_FALSE(p->feed(in.data(), in.size()));
    EXPECT_EQ(p->error_status(), 413);
  }
  {
    Collected c;
    auto p = parser(c, l);
    std::string in = "GARBAGE\r\n\r\n";
    EXPECT_FALSE(p->feed(in.data(), in.size()));
    EXPECT_EQ(p->error_status(), 400);
    EXPECT_FALSE(p->feed("GET / HTTP/1.1\r\n\r\n", 18));  // stays failed
  }
}

TEST(MasterHttp1, UpgradeHandedOutThenStops) {
  Collected c;
  auto p = parser(c);
  std::string in = "GET /exec HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
  EXPECT_TRUE(p->feed(in.data(), in.size()));
  ASSERT_EQ(c.reqs.size(), 1u);
  EXPECT_TRUE(c.reqs[0].upgrade);
  EXPECT_FALSE(c.keep[0]);
  EXPECT_TRUE(p->upgraded());
  // The bytes after the head belong to the upgraded protocol (the server
  // leaves them for the connection's new owner).
  EXPECT_EQ(in.substr(p->consumed()), "\x81\x05hello");
  EXPECT_FALSE(p->feed("x", 1));
  EXPECT_EQ(p->consumed(), 0u);
}

TEST(MasterHttp, StatusErrorShape) {
  auto r = status_error(403, "nope");
  auto j = nlohmann::json::parse(r.body);
  EXPECT_EQ(r.status, 403);
  EXPECT_EQ(j, (nlohmann::json{{"kind", "Status"},
                               {"apiVersion", "v1"},
                               {"metadata", nlohmann::json::object()},
                               {"status", "Failure"},
                               {"message", "nope"},
                               {"reason", "Forbidden"},
                               {"code", 403}}));
  std::string s = serialize_http1(r, false, false);
  EXPECT_EQ(s.rfind("HTTP/1.1 403 Forbidden\r\n", 0), 0u);
  EXPECT_NE(s.find("Connection: close\r\n"), std::string::npos);
}
