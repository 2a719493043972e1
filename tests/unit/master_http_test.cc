// The master front end's response side (master/http.h); request parsing is
// tests/unit/http1_test.cc (proto/http1.h).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "master/http.h"

using namespace shimlet::master;

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

TEST(MasterHttp, QueryParams) {
  Request r;
  r.query = "a=1&b=%20c&a=2";
  auto q = r.query_params();
  EXPECT_EQ(q.find("b")->second, " c");
  EXPECT_EQ(q.count("a"), 2u);
  r.headers = {{"x-multi", "a"}, {"x-multi", "b"}};
  EXPECT_EQ(r.header("x-multi"), "a");
  EXPECT_EQ(r.header("none"), "");
}
