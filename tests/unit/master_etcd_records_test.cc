// The registry's keys and values in etcd (master/etcd_records.h): what other
// masters wrote is decoded as untrusted input.
#include <gtest/gtest.h>

#include "common/error.h"
#include "master/etcd_records.h"

using namespace shimlet;
using namespace shimlet::master;
namespace er = shimlet::master::etcd_records;

namespace {
Registration reg() {
  Registration r;
  r.id = "c1";
  r.node = "n1";
  r.namespace_ = "dev";
  r.pod = "p";
  r.container = "app";
  r.endpoint = "10.0.0.1:4000";
  r.pin = "sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
  r.annotations["a"] = "b";
  r.pid = 7;
  return r;
}
}  // namespace

TEST(EtcdRecords, Keys) {
  EXPECT_EQ(er::key_prefix("/shimlet"), "/shimlet/");
  EXPECT_EQ(er::key_prefix("/x//"), "/x/");
  EXPECT_THROW(er::key_prefix("/"), Error);
  EXPECT_THROW(er::key_prefix("a\nb"), Error);
  const std::string p = "/s/";
  EXPECT_EQ(er::container_key(p, "c1"), "/s/containers/c1");
  auto k = er::parse_key(p, "/s/containers/c1");
  EXPECT_EQ(k.kind, er::Kind::Container);
  EXPECT_EQ(k.name, "c1");
  k = er::parse_key(p, er::node_key(p, "node-a"));
  EXPECT_EQ(k.kind, er::Kind::Node);
  EXPECT_EQ(k.name, "node-a");
  EXPECT_EQ(er::parse_key(p, er::master_key(p, "0a1b")).kind, er::Kind::Master);
  for (const char* other : {"/s/containers/", "/s/containers/a/b", "/s/containers/-x", "/t/containers/c1",
                            "/s/masters/XYZ", "/s/nodes/..", "/s/compact_rev_key", "/s/"})
    EXPECT_EQ(er::parse_key(p, other).kind, er::Kind::Other) << other;
}

TEST(EtcdRecords, ContainerRoundTripAndChecks) {
  Registration r = reg();
  std::string v = er::encode_container(r);
  EXPECT_EQ(v, er::encode_container(reg()));  // deterministic: an unchanged renewal writes nothing
  Registration back = er::decode_container(v, "c1");
  EXPECT_EQ(back.node, "n1");
  EXPECT_EQ(back.endpoint, r.endpoint);
  EXPECT_EQ(back.annotations.at("a"), "b");
  EXPECT_EQ(back.pid, 7);
  EXPECT_THROW(er::decode_container(v, "c2"), Error);  // under another container's key
  r.node = "";
  EXPECT_THROW(er::decode_container(er::encode_container(r), "c1"), Error);  // no owner
  EXPECT_THROW(er::decode_container("{", "c1"), Error);
  EXPECT_THROW(er::decode_container(std::string(70000, ' '), "c1"), Error);
}

TEST(EtcdRecords, NodeAndMaster) {
  auto n = er::decode_node(er::encode_node({"n1", 42, 60}), "n1");
  EXPECT_EQ(n.lease, 42);
  EXPECT_EQ(n.ttl_s, 60);
  EXPECT_THROW(er::decode_node(er::encode_node({"n2", 42, 60}), "n1"), Error);
  EXPECT_THROW(er::decode_node(er::encode_node({"n1", 0, 60}), "n1"), Error);
  EXPECT_THROW(er::decode_node(R"({"node":"n1","lease":"42","ttl":1})", "n1"), Error);
  EXPECT_THROW(er::decode_node(std::string(5000, 'x'), "n1"), Error);
  auto m = er::decode_master(er::encode_master({"ab", "h:6443", "2026-01-01T00:00:00Z", 5}), "ab");
  EXPECT_EQ(m.host, "h:6443");
  EXPECT_THROW(er::decode_master(er::encode_master({"ab", "h", "", 5}), "cd"), Error);
  EXPECT_TRUE(er::valid_master_id("0123456789abcdef"));
  EXPECT_FALSE(er::valid_master_id("ABC"));
  EXPECT_FALSE(er::valid_master_id(""));
}
