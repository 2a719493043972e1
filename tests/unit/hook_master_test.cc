// The hook config's "master" object (docs/design.md "Master registration").
#include <gtest/gtest.h>

#include "common/error.h"
#include "hook/hook.h"

using namespace shimlet;
using namespace shimlet::hook;

TEST(HookMasterConfig, Parses) {
  Config c = parse_config(R"({"trusted_keys": ["/etc/shimlet/master.pub"],
      "master": {"url": "https://127.0.0.1:6443", "node": "n1", "ca": "/ca.crt", "token_file": "/tok",
                 "renew_interval_s": 5, "timeout_ms": 2500}})",
                          "/bin");
  ASSERT_TRUE(c.master);
  EXPECT_EQ(c.trusted_keys.at(0).kid, "master");
  EXPECT_EQ(c.master->urls, std::vector<std::string>{"https://127.0.0.1:6443"});
  EXPECT_EQ(c.master->node, "n1");
  EXPECT_EQ(c.master->token_file, "/tok");
  EXPECT_EQ(c.master->renew_interval_s, 5);
  EXPECT_EQ(c.master->timeout_ms, 2500);
  c = parse_config(R"({"master": {"url": "https://m", "client_cert": "/c", "client_key": "/k"}})", "/bin");
  ASSERT_TRUE(c.master);
  EXPECT_FALSE(c.master->node.empty());  // the host name
  EXPECT_EQ(c.master->renew_interval_s, 20);
  EXPECT_FALSE(parse_config("{}", "/bin").master);
}

TEST(HookMasterConfig, RefusesBadOnes) {
  for (const char* bad : {
           R"({"master": "https://m"})",
           R"({"master": {"node": "n", "token": "t"}})",
           R"({"master": {"url": "http://m", "token": "t"}})",
           R"({"master": {"url": "https://m"}})",
           R"({"master": {"url": "https://m", "token": "t", "token_file": "/t"}})",
           R"({"master": {"url": "https://m", "client_cert": "/c"}})",
           R"({"master": {"url": "https://m", "token": "t", "client_cert": "/c", "client_key": "/k"}})",
           R"({"master": {"url": "https://m", "token": "t x"}})",
           R"({"master": {"url": "https://m", "token": "t", "node": "../x"}})",
           R"({"master": {"url": "https://m", "token": "t", "ca": "relative"}})",
           R"({"master": {"url": "https://m", "token": "t", "renew_interval_s": 0}})",
           R"({"master": {"url": "https://m", "token": "t", "timeout_ms": 10}})",
           R"({"master": {"url": "https://m", "token": "t", "tokn": "x"}})",
       })
    EXPECT_THROW(parse_config(bad, "/bin"), Error) << bad;
}

// Sessions refuse tickets for another node: shim.json carries the node.
TEST(HookMasterConfig, ShimJsonCarriesTheNode) {
  oci::State st;
  st.id = "c1";
  st.pid = 1;
  st.bundle = "/b";
  Config c = parse_config(R"({"master": {"url": "https://m", "node": "n7", "token_file": "/tok"}})", "/bin");
  EXPECT_EQ(shim_json(c, st, "/d", {})["node"], "n7");
  EXPECT_FALSE(shim_json(parse_config("{}", "/bin"), st, "/d", {}).contains("node"));  // no master: not checked
}
