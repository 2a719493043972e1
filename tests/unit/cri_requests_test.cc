// shimlet-cri's pure decisions (cri/requests.h) and the registration and hook
// config fields it relies on.
#include <gtest/gtest.h>

#include <limits>

#include "common/error.h"
#include "cri/requests.h"
#include "hook/hook.h"

using namespace shimlet;
using runtime::v1::ExecRequest;
using runtime::v1::ExecSyncRequest;
using runtime::v1::PortForwardRequest;

namespace {

ExecRequest exec_req(std::vector<std::string> cmd, bool tty, bool in, bool out, bool err) {
  ExecRequest r;
  r.set_container_id("c0ffee");
  for (auto& a : cmd) r.add_cmd(a);
  r.set_tty(tty);
  r.set_stdin(in);
  r.set_stdout(out);
  r.set_stderr(err);
  return r;
}

client::Registration reg(std::string id, std::string sandbox_id, bool sandbox = false,
                         std::string cri = "127.0.0.1:1") {
  client::Registration r;
  r.id = std::move(id);
  r.sandbox_id = std::move(sandbox_id);
  r.sandbox = sandbox;
  r.cri_endpoint = std::move(cri);
  return r;
}

}  // namespace

TEST(CriExec, PlansValidRequestsAndLeavesTheRestToTheRuntime) {
  auto p = cri::plan_exec(exec_req({"sh", "-c", "x"}, false, true, true, true));
  ASSERT_TRUE(p);
  EXPECT_EQ(p->cmd, (std::vector<std::string>{"sh", "-c", "x"}));
  ticket::Claims c = cri::exec_claims(*p);
  EXPECT_EQ(c.verb, "exec");
  EXPECT_TRUE(c.stdin_);
  EXPECT_FALSE(c.tty);
  // The kubelet streaming server's refusals are the runtime's to give.
  EXPECT_FALSE(cri::plan_exec(exec_req({"sh"}, true, false, true, true)));     // tty + stderr
  EXPECT_FALSE(cri::plan_exec(exec_req({"sh"}, false, false, false, false)));  // no stream
  EXPECT_FALSE(cri::plan_exec(exec_req({}, false, false, true, false)));       // no command
  ExecRequest bad = exec_req({"sh"}, false, false, true, false);
  for (const char* id : {"", "..", "a/b", "x y"}) {
    bad.set_container_id(id);
    EXPECT_FALSE(cri::plan_exec(bad)) << id;
  }
}

TEST(CriExec, UrlNamesOnlyStreamsTheShimWouldNotChooseItself) {
  const std::string ep = "127.0.0.1:4000";
  EXPECT_EQ(cri::exec_url(ep, "T", *cri::plan_exec(exec_req({"x"}, false, false, true, true))),
            "http://127.0.0.1:4000/exec/T");
  EXPECT_EQ(cri::exec_url(ep, "T", *cri::plan_exec(exec_req({"x"}, true, true, true, false))),
            "http://127.0.0.1:4000/exec/T");
  EXPECT_EQ(cri::exec_url(ep, "T", *cri::plan_exec(exec_req({"x"}, false, true, false, true))),
            "http://127.0.0.1:4000/exec/T?stdout=false");
  EXPECT_EQ(cri::exec_url(ep, "T", *cri::plan_exec(exec_req({"x"}, false, true, false, false))),
            "http://127.0.0.1:4000/exec/T?stdout=false&stderr=false");
  EXPECT_EQ(cri::exec_url(ep, "T", *cri::plan_exec(exec_req({"x"}, false, false, true, false))),
            "http://127.0.0.1:4000/exec/T?stderr=false");
}

TEST(CriPortForward, PortsDedupedNoneMeansAnyInvalidGoesToTheRuntime) {
  PortForwardRequest r;
  r.set_pod_sandbox_id("sbx");
  auto any = cri::plan_port_forward(r);
  ASSERT_TRUE(any);
  EXPECT_EQ(*any, (std::vector<ticket::Port>{{0, "tcp"}}));
  for (int p : {80, 443, 80}) r.add_port(p);
  EXPECT_EQ(*cri::plan_port_forward(r), (std::vector<ticket::Port>{{80, "tcp"}, {443, "tcp"}}));
  EXPECT_EQ(cri::port_forward_claims(*cri::plan_port_forward(r)).verb, "portforward");
  for (int bad : {0, -1, 65536}) {
    PortForwardRequest b = r;
    b.add_port(bad);
    EXPECT_FALSE(cri::plan_port_forward(b)) << bad;
  }
  EXPECT_EQ(cri::port_forward_url("[::1]:9", "T"), "http://[::1]:9/portforward/T");
}

TEST(CriExecSync, TimeoutAndValidation) {
  ExecSyncRequest r;
  r.set_container_id("c1");
  EXPECT_FALSE(cri::plan_exec_sync(r));  // no command
  r.add_cmd("true");
  EXPECT_EQ(cri::plan_exec_sync(r)->timeout_ms, 0);
  r.set_timeout(3);
  EXPECT_EQ(cri::plan_exec_sync(r)->timeout_ms, 3000);
  r.set_timeout(-1);
  EXPECT_FALSE(cri::plan_exec_sync(r));
  r.set_timeout(int64_t{1} << 40);
  EXPECT_EQ(cri::plan_exec_sync(r)->timeout_ms, 0);  // beyond any timer: none
  // The exec's timer takes an int of milliseconds: the longest timeout it
  // holds is kept exactly, a longer one is none (4294968 s wrapped to 704 ms).
  r.set_timeout(std::numeric_limits<int>::max() / 1000);
  EXPECT_EQ(cri::plan_exec_sync(r)->timeout_ms, int64_t{std::numeric_limits<int>::max() / 1000} * 1000);
  for (int64_t t : {int64_t{std::numeric_limits<int>::max() / 1000 + 1}, int64_t{4294968}, int64_t{1} << 29}) {
    r.set_timeout(t);
    EXPECT_EQ(cri::plan_exec_sync(r)->timeout_ms, 0) << t;
  }
}

TEST(CriExecSync, TimeoutMessageAsContainerd) {
  EXPECT_EQ(cri::go_duration(1), "1s");
  EXPECT_EQ(cri::go_duration(59), "59s");
  EXPECT_EQ(cri::go_duration(60), "1m0s");
  EXPECT_EQ(cri::go_duration(90), "1m30s");
  EXPECT_EQ(cri::go_duration(7200), "2h0m0s");
  EXPECT_EQ(cri::go_duration(3661), "1h1m1s");
  EXPECT_EQ(cri::exec_sync_timeout_message(1),
            "failed to exec in container: timeout 1s exceeded: context deadline exceeded");
}

TEST(CriPodTarget, SandboxOwnShimFirstElseLowestAppContainer) {
  std::vector<client::Registration> live = {reg("b-app", "sbx"), reg("a-app", "sbx"), reg("c-other", "sbx2")};
  ASSERT_NE(cri::pick_pod_target(live, "sbx"), nullptr);
  EXPECT_EQ(cri::pick_pod_target(live, "sbx")->id, "a-app");
  EXPECT_EQ(cri::pick_pod_target(live, "none"), nullptr);
  live.push_back(reg("sbx", "sbx", true));  // CRI-O runs hooks for the infra container too
  EXPECT_EQ(cri::pick_pod_target(live, "sbx")->id, "sbx");
  // Without a CRI listener a shim cannot serve the URL.
  std::vector<client::Registration> no_listener = {reg("a-app", "sbx", false, "")};
  EXPECT_EQ(cri::pick_pod_target(no_listener, "sbx"), nullptr);
}

TEST(CriRegistration, FieldsShimletCriReads) {
  auto r = client::parse_registration(
      R"({"id":"c1","endpoint":"127.0.0.1:1","pin":"p","cri_endpoint":"127.0.0.1:2","shim_pid":42,
          "shim_start_time":99,"annotations":{"io.kubernetes.cri.sandbox-id":"s1"}})",
      "/r");
  EXPECT_EQ(r.cri_endpoint, "127.0.0.1:2");
  EXPECT_EQ(r.shim_pid, 42);
  EXPECT_EQ(r.shim_start_time, 99u);
  EXPECT_EQ(r.sandbox_id, "s1");
  auto crio = client::parse_registration(
      R"({"id":"c1","endpoint":"e","pin":"p","annotations":{"io.kubernetes.cri-o.SandboxID":"s2"}})", "/r");
  EXPECT_EQ(crio.sandbox_id, "s2");
  EXPECT_EQ(crio.shim_pid, 0);
  // A malformed shim_pid reads as not recorded: shimlet-cri then trusts no shim (cri/service.cc).
  EXPECT_EQ(client::parse_registration(R"({"id":"c","endpoint":"e","pin":"p","shim_pid":"1"})", "/r").shim_pid, 0);
}

TEST(CriHookConfig, CriListenIsLoopbackOnly) {
  EXPECT_EQ(hook::parse_config("{}", "/b").cri_listen, "");
  for (const char* ok : {"127.0.0.1:0", "127.1.2.3:8080", "[::1]:0"})
    EXPECT_EQ(hook::parse_config(std::string(R"({"cri_listen":")") + ok + "\"}", "/b").cri_listen, ok);
  for (const char* bad :
       {"0.0.0.0:0", "10.0.0.1:80", "[::]:0", "localhost:0", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:x"})
    EXPECT_THROW(hook::parse_config(std::string(R"({"cri_listen":")") + bad + "\"}", "/b"), Error) << bad;
}
