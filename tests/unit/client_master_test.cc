// shimctl master mode: kubeconfig merging and flag precedence (the grant
// requests themselves run against a real master in test_master_e2e.py).
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "client/client.h"
#include "common/error.h"
#include "masterclient/masterclient.h"
#include "tests/unit/temp_dir.h"

using namespace shimlet;
using namespace shimlet::client;

namespace {

const char* kConfig = R"(
apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: c1
  cluster: {server: "https://10.0.0.1:6443", certificate-authority: ca.crt}
- name: c2
  cluster: {server: "https://10.0.0.2:6443", certificate-authority-data: "LS0tLS1CRUdJTg=="}
users:
- name: alice
  user: {token: tok-a}
- name: carol
  user: {client-certificate: certs/carol.crt, client-key: /abs/carol.key}
- name: plug
  user:
    exec: {command: get-token}
contexts:
- name: dev
  context: {cluster: c1, user: alice, namespace: team}
- name: other
  context: {cluster: c2, user: carol}
)";

// A TempDir that writes files into itself.
struct TempDir : shimlet::test::TempDir {
  TempDir() : shimlet::test::TempDir("client-master-test") {}
  std::string write(const std::string& name, const std::string& text) {
    std::string p = path + "/" + name;
    std::filesystem::create_directories(std::filesystem::path(p).parent_path());
    std::ofstream(p) << text;
    return p;
  }
};

}  // namespace

TEST(Kubeconfig, ParsesAndResolvesRelativePaths) {
  KubeConfig kc;
  merge_kubeconfig(kc, kConfig, "/etc/kube/config");
  EXPECT_EQ(kc.current_context, "dev");
  EXPECT_EQ(kc.clusters.at("c1").ca_file, "/etc/kube/ca.crt");
  EXPECT_EQ(kc.clusters.at("c2").ca_pem, "-----BEGIN");
  EXPECT_EQ(kc.users.at("carol").cert_file, "/etc/kube/certs/carol.crt");
  EXPECT_EQ(kc.users.at("carol").key_file, "/abs/carol.key");
  EXPECT_FALSE(kc.users.at("plug").unsupported.empty());
  EXPECT_EQ(kc.contexts.at("dev").ns, "team");
}

TEST(Kubeconfig, FirstFileWins) {
  KubeConfig kc;
  merge_kubeconfig(kc, "current-context: first\nusers:\n- {name: alice, user: {token: one}}\n", "/a/config");
  merge_kubeconfig(kc, kConfig, "/b/config");
  EXPECT_EQ(kc.current_context, "first");
  EXPECT_EQ(kc.users.at("alice").token, "one");
  EXPECT_EQ(kc.users.at("carol").cert_file, "/b/certs/carol.crt");
}

TEST(Kubeconfig, BadInputNamesTheFile) {
  for (const char* bad : {"clusters: [", "- a list", "clusters: {a: 1}", "users: [{user: {token: x}}]",
                          "clusters: [{name: c, cluster: {server: [1]}}]",
                          "clusters: [{name: c, cluster: {certificate-authority-data: '!!!'}}]"}) {
    KubeConfig kc;
    try {
      merge_kubeconfig(kc, bad, "/x/kubeconfig");
      ADD_FAILURE() << "accepted: " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("/x/kubeconfig"), std::string::npos) << e.what();
    }
  }
  KubeConfig kc;
  EXPECT_NO_THROW(merge_kubeconfig(kc, "", "/x/empty"));
}

TEST(MasterSettings, FlagsBeatKubeconfig) {
  TempDir d;
  d.write("ca.crt", "CA-PEM");
  d.write("certs/carol.crt", "CAROL-CERT");
  std::string kc = d.write("config", kConfig);
  Invocation inv;
  inv.master.kubeconfig = kc;
  MasterSettings s = master_settings(inv);
  ASSERT_EQ(s.masters.size(), 1u);
  EXPECT_EQ(s.masters[0].server, "https://10.0.0.1:6443");
  EXPECT_EQ(s.masters[0].ca_pem, "CA-PEM");
  EXPECT_EQ(s.masters[0].token, "tok-a");
  EXPECT_EQ(s.ns, "team");
  inv.master.token = "flag-token";
  inv.master.servers = {"https://10.9.9.9:1"};
  s = master_settings(inv);
  ASSERT_EQ(s.masters.size(), 1u);
  EXPECT_EQ(s.masters[0].token, "flag-token");
  EXPECT_EQ(s.masters[0].server, "https://10.9.9.9:1");
  EXPECT_EQ(s.masters[0].ca_pem, "");  // the kubeconfig's CA belongs to its own server
  inv.master = {};
  inv.master.kubeconfig = kc;
  inv.master.contexts = {"nope"};
  EXPECT_THROW(master_settings(inv), std::exception);
  inv.master.contexts = {"other"};  // carol's key file does not exist
  EXPECT_THROW(master_settings(inv), std::exception);
  inv.master = {};
  inv.master.kubeconfig = d.path + "/missing";
  EXPECT_THROW(master_settings(inv), std::exception);
}

// Several masters: a --server list shares the flags' credential and takes
// each server's CA from the context whose cluster it is; a --context list
// gives one master per context, each with its own CA and user.
TEST(MasterSettings, SeveralMasters) {
  TempDir d;
  d.write("ca.crt", "CA-PEM");
  std::string kc = d.write("config", kConfig);
  Invocation inv;
  inv.master.kubeconfig = kc;
  inv.master.servers = {"https://10.0.0.9:6443", "https://10.0.0.1:6443"};
  MasterSettings s = master_settings(inv);
  ASSERT_EQ(s.masters.size(), 2u);
  EXPECT_EQ(s.masters[0].server, "https://10.0.0.9:6443");
  EXPECT_EQ(s.masters[0].ca_pem, "");
  EXPECT_EQ(s.masters[0].token, "tok-a");  // the current context's user
  EXPECT_EQ(s.masters[1].server, "https://10.0.0.1:6443");
  EXPECT_EQ(s.masters[1].ca_pem, "CA-PEM");
  d.write("k2", std::string(kConfig) + R"(
- name: dev-b
  context: {cluster: c2, user: alice, namespace: team-b}
)");
  inv.master = {};
  inv.master.kubeconfig = d.path + "/k2";
  inv.master.contexts = {"dev", "dev-b"};
  s = master_settings(inv);
  ASSERT_EQ(s.masters.size(), 2u);
  EXPECT_EQ(s.masters[0].server, "https://10.0.0.1:6443");
  EXPECT_EQ(s.masters[0].ca_pem, "CA-PEM");
  EXPECT_EQ(s.masters[1].server, "https://10.0.0.2:6443");
  EXPECT_EQ(s.masters[1].ca_pem, "-----BEGIN");
  EXPECT_EQ(s.masters[1].token, "tok-a");
  EXPECT_EQ(s.ns, "team");  // the first context's
  auto ms = master_targets(s, 1000, "https://10.0.0.2:6443");
  EXPECT_EQ(ms.current().server, "https://10.0.0.2:6443");  // the one that granted goes first
  EXPECT_EQ(ms.size(), 2u);
  auto inv2 = parse_args({"shimctl", "--server", "https://a:1,https://b:2", "--server", "https://c:3", "--context",
                          "x,y", "exec", "pod", "--", "true"});
  EXPECT_EQ(inv2.master.servers, (std::vector<std::string>{"https://a:1", "https://b:2", "https://c:3"}));
  EXPECT_EQ(inv2.master.contexts, (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(inv2.exec.target, "pod");
}

TEST(MasterSettings, NothingConfigured) {
  TempDir d;
  setenv("HOME", d.path.c_str(), 1);
  unsetenv("KUBECONFIG");
  Invocation inv;
  EXPECT_THROW(master_settings(inv), UsageError);
  inv.master.servers = {"https://127.0.0.1:6443"};
  EXPECT_THROW(master_settings(inv), UsageError);  // no credential
  inv.master.token = "t";
  EXPECT_EQ(master_settings(inv).masters.at(0).token, "t");
  setenv("KUBECONFIG", (d.path + "/a:" + d.path + "/b").c_str(), 1);
  EXPECT_EQ(kubeconfig_paths(""), (std::vector<std::string>{d.path + "/a", d.path + "/b"}));
  EXPECT_EQ(kubeconfig_paths("/x"), std::vector<std::string>{"/x"});
  unsetenv("KUBECONFIG");
  EXPECT_EQ(kubeconfig_paths(""), std::vector<std::string>{d.path + "/.kube/config"});
}

TEST(MasterArgs, FlagsParse) {
  Invocation inv = parse_args({"shimctl", "--server", "https://m:6443", "--token", "t", "--certificate-authority",
                               "/ca", "exec", "-n", "dev", "pod", "--kubeconfig", "/k", "--", "id"});
  EXPECT_FALSE(inv.local);
  EXPECT_EQ(inv.master.servers, std::vector<std::string>{"https://m:6443"});
  EXPECT_EQ(inv.master.token, "t");
  EXPECT_EQ(inv.master.ca, "/ca");
  EXPECT_EQ(inv.master.kubeconfig, "/k");
  EXPECT_TRUE(inv.ns_set);
  EXPECT_EQ(inv.ns, "dev");
  inv = parse_args({"shimctl", "exec", "pod", "--", "id"});
  EXPECT_FALSE(inv.ns_set);
  EXPECT_EQ(inv.ns, "default");
}
