// Authorization for shimlet-master: Kubernetes RBAC (rbac.authorization.k8s.io/v1
// Role, ClusterRole, RoleBinding, ClusterRoleBinding) read from YAML manifests
// as users already write them. Deny by default; only allow rules exist.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::master {

struct PolicyRule {
  std::vector<std::string> verbs, api_groups, resources, resource_names;
  // ClusterRole only: paths such as "/metrics" or "/debug/*" (a trailing *
  // matches any suffix), for requests that are not about a resource.
  std::vector<std::string> non_resource_urls;
};

struct Role {
  std::string kind;        // "Role" | "ClusterRole"
  std::string namespace_;  // Role only
  std::string name;
  std::vector<PolicyRule> rules;
};

struct Subject {
  std::string kind;  // "User" | "Group" | "ServiceAccount"
  std::string name, namespace_;
};

struct Binding {
  std::string kind;        // "RoleBinding" | "ClusterRoleBinding"
  std::string namespace_;  // RoleBinding only
  std::string name;
  std::string role_kind, role_name;  // roleRef
  std::vector<Subject> subjects;
};

// What is being asked, as kube-apiserver's authorizer.Attributes.
struct Attributes {
  std::string user;
  std::vector<std::string> groups;
  std::string verb;         // get, list, create, ...
  std::string api_group;    // "" for core
  std::string resource;     // "pods"
  std::string subresource;  // "exec", "portforward" or ""
  std::string namespace_;   // "" = cluster-scoped / all namespaces
  std::string name;         // "" = collection
  // A non-resource request (e.g. GET /metrics): its path, matched against
  // rules' nonResourceURLs; resource, namespace and name are then empty, and
  // only ClusterRoleBindings grant it (kube-apiserver's RBAC).
  std::string path;
};

struct Decision {
  bool allowed = false;
  std::string reason;  // which binding/role allowed it, or why not
};

class Policy {
 public:
  // Adds every RBAC object in a (multi-document) YAML text; other kinds (and
  // `kind: List` items) are walked/ignored as kubectl apply would. Throws
  // shimlet::Error("SOURCE: ...") on malformed YAML or malformed RBAC objects.
  void add_yaml(std::string_view yaml, const std::string& source = "<yaml>");
  // A file, or a directory (its *.yaml, *.yml, *.json files, sorted, not recursive).
  void load_path(const std::string& path);

  Decision authorize(const Attributes& a) const;

  const std::vector<Role>& roles() const { return roles_; }
  const std::vector<Binding>& bindings() const { return bindings_; }

 private:
  std::vector<Role> roles_;
  std::vector<Binding> bindings_;
};

}  // namespace shimlet::master
