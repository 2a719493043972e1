#include <gtest/gtest.h>

#include "common/error.h"
#include "master/registry.h"
#include "master/registry_memory.h"

using namespace shimlet::master;

namespace {
std::string reg_json(const std::string& id, const std::string& ns, const std::string& pod, const std::string& c,
                     const std::string& extra = "") {
  return R"({"id":")" + id + R"(","pid":1,"bundle":"/b","runtime_root":"","namespace":")" + ns + R"(","pod":")" + pod +
         R"(","container":")" + c +
         R"(","endpoint":"127.0.0.1:4000","pin":"sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","shim_pid":2,)"
         R"("created":"2026-11-26T18:40:00Z","annotations":{})" +
         extra + "}";
}
}  // namespace

TEST(MasterRegistry, ParseValidates) {
  auto r = parse_registration(reg_json("abc", "dev", "p", "c"));
  EXPECT_EQ(r.id, "abc");
  EXPECT_EQ(r.namespace_, "dev");
  EXPECT_EQ(r.endpoint, "127.0.0.1:4000");
  for (const std::string& bad :
       {std::string("{"), std::string("[]"), reg_json("-x", "dev", "p", "c"), reg_json("a/b", "dev", "p", "c"),
        reg_json("abc", "", "p", "c"), reg_json("abc", "dev", "..", "c"), reg_json("abc", "d/e", "p", "c"),
        reg_json("abc", "dev", "p", "c", R"(,"node":"")") + "x",
        std::string(R"({"id":"a","namespace":"n","pod":"p","container":"c","endpoint":"h:0","pin":"sha256/x"})"),
        std::string(R"({"id":"a","namespace":"n","pod":"p","container":"c","endpoint":"h:1","pin":"md5/x"})")}) {
    EXPECT_THROW(parse_registration(bad), shimlet::Error) << bad;
  }
}

TEST(MasterRegistry, NodeOfUser) {
  EXPECT_EQ(node_of_user("system:node:n1"), "n1");
  EXPECT_FALSE(node_of_user("system:node:"));
  EXPECT_FALSE(node_of_user("alice"));
  EXPECT_FALSE(node_of_user("system:node:a/b"));
}

TEST(MasterRegistry, LeaseRenewExpire) {
  MemoryRegistry reg(1000);
  auto r = parse_registration(reg_json("c1", "dev", "p", "app"));
  EXPECT_EQ(reg.put_at("n1", "c1", r, 0).code, 201);
  EXPECT_EQ(reg.put_at("n1", "c1", r, 900).code, 200);  // renewed: now expires at 1900
  EXPECT_EQ(reg.entries().list("dev", 1500).size(), 1u);
  EXPECT_EQ(reg.entries().list("dev", 1900).size(), 0u);  // lapsed (even before expire() runs)
  auto gone = reg.expire(1900);
  ASSERT_EQ(gone.size(), 1u);
  EXPECT_EQ(gone[0].id, "c1");
  EXPECT_EQ(reg.entries().size(), 0u);
}

TEST(MasterRegistry, NodeIsolation) {
  MemoryRegistry reg(1000);
  auto r = parse_registration(reg_json("c1", "dev", "p", "app"));
  EXPECT_EQ(reg.put_at("n1", "c1", r, 0).code, 201);
  EXPECT_EQ(reg.put_at("n2", "c1", r, 10).code, 403);  // another node's live entry
  EXPECT_EQ(reg.remove_at("n2", "c1", 10).code, 403);
  EXPECT_EQ(reg.put_at("n1", "c2", r, 10).code, 400);  // id mismatch with the URL
  auto other = parse_registration(reg_json("c3", "dev", "p", "x", R"(,"node":"n1")"));
  EXPECT_EQ(reg.put_at("n2", "c3", other, 10).code, 403);  // says it is on n1
  EXPECT_EQ(reg.put_at("n2", "c1", r, 2000).code, 201);    // after the lease lapsed, it may
  EXPECT_EQ(reg.remove_at("n2", "c1", 2001).code, 200);
  EXPECT_EQ(reg.remove_at("n2", "c1", 2001).code, 404);
}

TEST(MasterRegistry, OwnerUntilExpired) {
  MemoryRegistry reg(1000);
  EXPECT_FALSE(reg.entries().owner("c1"));
  EXPECT_EQ(reg.put_at("n1", "c1", parse_registration(reg_json("c1", "dev", "p", "app")), 0).code, 201);
  EXPECT_EQ(reg.entries().owner("c1"), "n1");  // the lease is not looked at: known until expire() drops it
  EXPECT_EQ(reg.expire(999).size(), 0u);
  EXPECT_EQ(reg.entries().owner("c1"), "n1");
  EXPECT_EQ(reg.expire(1000).size(), 1u);
  EXPECT_FALSE(reg.entries().owner("c1"));
}

TEST(MasterRegistry, PodShapesAndFind) {
  MemoryRegistry reg(10000);
  reg.put_at("n1", "b1", parse_registration(reg_json("b1", "dev", "p", "b")), 0);
  reg.put_at("n1", "a1",
             parse_registration(reg_json("a1", "dev", "p", "a")
                                    .replace(reg_json("a1", "dev", "p", "a").find("\"annotations\":{}"), 16,
                                             R"("annotations":{"kubectl.kubernetes.io/default-container":"a"})")),
             1);
  reg.put_at("n1", "z1", parse_registration(reg_json("z1", "other", "q", "z")), 2);
  auto list = reg.entries().pod_list_json("dev", 5);
  EXPECT_EQ(list["kind"], "PodList");
  ASSERT_EQ(list["items"].size(), 1u);
  auto pod = reg.entries().pod_json("dev", "p", 5);
  ASSERT_TRUE(pod);
  EXPECT_EQ((*pod)["kind"], "Pod");
  EXPECT_EQ((*pod)["apiVersion"], "v1");
  EXPECT_EQ((*pod)["metadata"]["name"], "p");
  EXPECT_EQ((*pod)["metadata"]["namespace"], "dev");
  EXPECT_EQ((*pod)["spec"]["containers"].size(), 2u);
  EXPECT_EQ((*pod)["status"]["phase"], "Running");
  EXPECT_EQ(reg.entries().pod_list_json("", 5)["items"].size(), 2u);
  EXPECT_FALSE(reg.entries().pod_json("dev", "nope", 5));
  EXPECT_EQ(reg.entries().find("dev", "p", "", 5).registration->id, "a1");  // default-container annotation
  EXPECT_EQ(reg.entries().find("dev", "p", "b", 5).registration->id, "b1");
  auto no_container = reg.entries().find("dev", "p", "c", 5);
  EXPECT_FALSE(no_container.registration);
  EXPECT_EQ(no_container.status, 400);
  EXPECT_NE(no_container.error.find("not valid"), std::string::npos);
  auto no_pod = reg.entries().find("dev", "q", "", 5);
  EXPECT_FALSE(no_pod.registration);
  EXPECT_EQ(no_pod.status, 404);
  EXPECT_NE(no_pod.error.find("not found"), std::string::npos);
}

TEST(MasterRegistry, UnspecifiedHostBecomesPeer) {
  MemoryRegistry reg(1000);
  auto r = parse_registration(reg_json("c1", "dev", "p", "app"));
  r.endpoint = "0.0.0.0:555";
  reg.put_at("n1", "c1", r, 0, "10.1.2.3");
  EXPECT_EQ(reg.entries().list("", 1)[0].endpoint, "10.1.2.3:555");
  r.endpoint = "[::]:556";
  reg.put_at("n1", "c1", r, 0, "fd00::1");
  EXPECT_EQ(reg.entries().list("", 1)[0].endpoint, "[fd00::1]:556");
}
