#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "common/error.h"
#include "master/rbac.h"

using namespace shimlet::master;

namespace {
const char* kPolicy = R"(
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: exec}
rules:
- apiGroups: [""]
  resources: ["pods/exec"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: alice-exec, namespace: dev}
subjects: [{kind: User, name: alice}]
roleRef: {kind: ClusterRole, name: exec, apiGroup: rbac.authorization.k8s.io}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pf-web1, namespace: web}
rules:
- apiGroups: ["*"]
  resources: ["*/portforward"]
  resourceNames: ["web-1"]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: ops-pf, namespace: web}
subjects:
- {kind: Group, name: ops}
- {kind: ServiceAccount, name: deployer, namespace: ci}
roleRef: {kind: Role, name: pf-web1}
---
apiVersion: v1
kind: List
items:
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRole
  metadata: {name: all}
  rules: [{apiGroups: ["*"], resources: ["*"], verbs: ["*"]}]
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRoleBinding
  metadata: {name: admins}
  subjects: [{kind: Group, name: admins}]
  roleRef: {kind: ClusterRole, name: all}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
)";

Attributes at(std::string user, std::vector<std::string> groups, std::string verb, std::string sub, std::string ns,
              std::string name) {
  return Attributes{std::move(user), std::move(groups), std::move(verb), "", "pods",
                    std::move(sub),  std::move(ns),     std::move(name), ""};
}
}  // namespace

TEST(MasterRbac, Matrix) {
  Policy p;
  p.add_yaml(kPolicy, "test");
  EXPECT_EQ(p.roles().size(), 3u);
  EXPECT_EQ(p.bindings().size(), 3u);
  struct Case {
    Attributes a;
    bool allowed;
  } cases[] = {
      {at("alice", {}, "create", "exec", "dev", "p"), true},
      {at("alice", {}, "create", "exec", "prod", "p"), false},        // RoleBinding is namespaced
      {at("alice", {}, "create", "portforward", "dev", "p"), false},  // other subresource
      {at("alice", {}, "get", "", "dev", "p"), true},
      {at("alice", {}, "list", "", "dev", ""), true},
      {at("alice", {}, "delete", "", "dev", "p"), false},
      {at("alice", {}, "get", "exec", "dev", "p"), false},  // verb on subresource
      {at("bob", {"ops"}, "create", "portforward", "web", "web-1"), true},
      {at("bob", {"ops"}, "create", "portforward", "web", "web-2"), false},  // resourceNames
      {at("bob", {"ops"}, "create", "portforward", "web", ""), false},
      {at("bob", {"ops"}, "create", "exec", "web", "web-1"), false},
      {at("system:serviceaccount:ci:deployer", {}, "create", "portforward", "web", "web-1"), true},
      {at("system:serviceaccount:web:deployer", {}, "create", "portforward", "web", "web-1"), false},
      {at("root", {"admins"}, "create", "exec", "anything", "x"), true},
      {at("root", {"admins"}, "list", "", "", ""), true},
      {at("alice", {"dev"}, "list", "", "", ""), false},
      {at("", {"admins"}, "list", "", "", ""), false},  // anonymous
  };
  for (const auto& c : cases) {
    Decision d = p.authorize(c.a);
    EXPECT_EQ(d.allowed, c.allowed) << c.a.user << " " << c.a.verb << " " << c.a.subresource << " " << c.a.namespace_
                                    << "/" << c.a.name << ": " << d.reason;
  }
  Decision d = p.authorize(at("alice", {}, "create", "exec", "dev", "p"));
  EXPECT_EQ(d.reason, "RBAC: allowed by RoleBinding \"dev/alice-exec\" of ClusterRole \"exec\" to User \"alice\"");
  d = p.authorize(at("alice", {}, "create", "exec", "prod", "p"));
  EXPECT_EQ(d.reason, "no RBAC rule allows user \"alice\" to create pods/exec \"p\" in namespace \"prod\"");
}

TEST(MasterRbac, DenyByDefault) {
  Policy p;
  EXPECT_FALSE(p.authorize(at("alice", {"system:masters"}, "get", "", "dev", "p")).allowed);
}

TEST(MasterRbac, RoleInOtherNamespaceDoesNotApply) {
  Policy p;
  p.add_yaml(R"(
kind: Role
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: r, namespace: a}
rules: [{apiGroups: [""], resources: ["pods/exec"], verbs: ["create"]}]
---
kind: RoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: b, namespace: b}
subjects: [{kind: User, name: u}]
roleRef: {kind: Role, name: r}
)");
  EXPECT_FALSE(p.authorize(at("u", {}, "create", "exec", "b", "x")).allowed);
  EXPECT_FALSE(p.authorize(at("u", {}, "create", "exec", "a", "x")).allowed);
}

TEST(MasterRbac, MalformedRefusedWhole) {
  for (const char* bad : {"kind: Role\nmetadata: {name: x\n", "- a\n- b\n",
                          "kind: Role\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: r}\nrules: 5\n",
                          "kind: Role\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: r}\n"
                          "rules: [{resources: [pods]}]\n",
                          "kind: RoleBinding\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: b}\n"
                          "subjects: [{kind: Robot, name: x}]\nroleRef: {kind: Role, name: r}\n",
                          "kind: ClusterRoleBinding\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: b}\n"
                          "roleRef: {kind: Role, name: r}\n",
                          "kind: Role\napiVersion: v1\nmetadata: {name: r}\n",
                          "kind: Role\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: [x]}\n"}) {
    Policy p;
    EXPECT_THROW(p.add_yaml(bad, "bad.yaml"), shimlet::Error) << bad;
    EXPECT_TRUE(p.roles().empty() && p.bindings().empty());
  }
}

TEST(MasterRbac, LoadsDirectory) {
  auto dir = std::filesystem::temp_directory_path() / ("mst-rbac-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "a.yaml") << "kind: ClusterRole\napiVersion: rbac.authorization.k8s.io/v1\n"
                                   "metadata: {name: c}\nrules: [{apiGroups: [''], resources: [pods], verbs: [get]}]\n";
  std::ofstream(dir / "b.yml") << "kind: ClusterRoleBinding\napiVersion: rbac.authorization.k8s.io/v1\n"
                                  "metadata: {name: cb}\nsubjects: [{kind: Group, name: g}]\n"
                                  "roleRef: {kind: ClusterRole, name: c}\n";
  std::ofstream(dir / "README.md") << "not yaml: [";
  Policy p;
  p.load_path(dir);
  std::filesystem::remove_all(dir);
  EXPECT_TRUE(p.authorize(at("u", {"g"}, "get", "", "any", "p")).allowed);
  EXPECT_FALSE(p.authorize(at("u", {"h"}, "get", "", "any", "p")).allowed);
}

// kube-apiserver's non-resource requests (GET /metrics): nonResourceURLs rules
// of ClusterRoles, granted only by ClusterRoleBindings; a trailing * matches a
// prefix; resource rules never match a path and path rules never a resource.
TEST(MasterRbac, NonResourceUrls) {
  Policy p;
  p.add_yaml(R"(
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: metrics}
rules:
- nonResourceURLs: ["/metrics", "/debug/*"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["*"]
  verbs: ["get"]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: prom}
subjects: [{kind: User, name: prom}]
roleRef: {kind: ClusterRole, name: metrics}
---
kind: RoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: ns-only, namespace: default}
subjects: [{kind: User, name: nsuser}]
roleRef: {kind: ClusterRole, name: metrics}
)",
             "test");
  auto path = [](std::string user, std::string verb, std::string p) {
    Attributes a{std::move(user), {}, std::move(verb), "", "", "", "", "", std::move(p)};
    return a;
  };
  EXPECT_TRUE(p.authorize(path("prom", "get", "/metrics")).allowed);
  EXPECT_TRUE(p.authorize(path("prom", "get", "/debug/pprof/heap")).allowed);
  EXPECT_FALSE(p.authorize(path("prom", "get", "/debug")).allowed);
  EXPECT_FALSE(p.authorize(path("prom", "get", "/metricsx")).allowed);
  EXPECT_FALSE(p.authorize(path("prom", "post", "/metrics")).allowed);
  EXPECT_FALSE(p.authorize(path("other", "get", "/metrics")).allowed);
  // a RoleBinding grants nothing outside its namespace, and a path has none
  EXPECT_FALSE(p.authorize(path("nsuser", "get", "/metrics")).allowed);
  EXPECT_TRUE(p.authorize(at("nsuser", {}, "get", "", "default", "x")).allowed);
  Decision d = p.authorize(path("other", "get", "/metrics"));
  EXPECT_NE(d.reason.find("path \"/metrics\""), std::string::npos) << d.reason;

  // the path-only rule never matches a resource request
  Policy q;
  q.add_yaml(R"(
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: star}
rules: [{nonResourceURLs: ["*"], verbs: ["*"]}]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: b}
subjects: [{kind: User, name: u}]
roleRef: {kind: ClusterRole, name: star}
)",
             "test");
  EXPECT_TRUE(q.authorize(path("u", "get", "/anything")).allowed);
  EXPECT_FALSE(q.authorize(at("u", {}, "create", "exec", "default", "pod")).allowed);
}

TEST(MasterRbac, NonResourceUrlsOnlyInClusterRoles) {
  for (const char* bad : {"kind: Role\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: r}\n"
                          "rules: [{nonResourceURLs: [/metrics], verbs: [get]}]\n",
                          "kind: ClusterRole\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: r}\n"
                          "rules: [{nonResourceURLs: [/metrics], resources: [pods], verbs: [get]}]\n"}) {
    Policy p;
    EXPECT_THROW(p.add_yaml(bad, "bad.yaml"), shimlet::Error) << bad;
  }
}
