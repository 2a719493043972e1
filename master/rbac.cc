#include "master/rbac.h"

#include <algorithm>
#include <filesystem>

#include "common/error.h"
#include "common/file.h"
#include "common/yaml.h"

namespace shimlet::master {
namespace {

constexpr size_t kMaxPolicyBytes = 4 << 20;

[[noreturn]] void bad(const std::string& where, const std::string& why) { throw Error(where + ": " + why); }

using yaml::Node;

std::string str_field(const Node& n, const char* key, const std::string& where, bool required) {
  const Node* v = n.get(key);
  if (!v || v->is_null()) {
    if (required) bad(where, std::string("missing ") + key);
    return "";
  }
  if (!v->is_scalar()) bad(where, std::string(key) + " must be a string");
  return v->scalar;
}

std::vector<std::string> str_list(const Node& n, const char* key, const std::string& where) {
  std::vector<std::string> out;
  const Node* v = n.get(key);
  if (!v || v->is_null()) return out;
  if (!v->is_seq()) bad(where, std::string(key) + " must be a list of strings");
  for (const auto& e : v->items) {
    if (!e.is_scalar()) bad(where, std::string(key) + " must be a list of strings");
    out.push_back(e.scalar);
  }
  return out;
}

bool contains(const std::vector<std::string>& v, std::string_view s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

bool has_or_star(const std::vector<std::string>& v, std::string_view s) { return contains(v, "*") || contains(v, s); }

// k8s.io/kubernetes/pkg/apis/rbac/v1 ResourceMatches.
bool resource_matches(const PolicyRule& r, const std::string& resource, const std::string& sub) {
  std::string combined = sub.empty() ? resource : resource + "/" + sub;
  for (const auto& rr : r.resources) {
    if (rr == "*" || rr == combined) return true;
    if (!sub.empty() && rr == "*/" + sub) return true;
  }
  return false;
}

// k8s.io/kubernetes/pkg/apis/rbac/v1 NonResourceURLMatches.
bool non_resource_matches(const PolicyRule& r, const std::string& path) {
  for (const auto& u : r.non_resource_urls) {
    if (u == "*" || u == path) return true;
    if (!u.empty() && u.back() == '*' && path.compare(0, u.size() - 1, u, 0, u.size() - 1) == 0) return true;
  }
  return false;
}

bool rule_allows(const PolicyRule& r, const Attributes& a) {
  if (!has_or_star(r.verbs, a.verb)) return false;
  if (!a.path.empty()) return non_resource_matches(r, a.path);
  if (!has_or_star(r.api_groups, a.api_group)) return false;
  if (!resource_matches(r, a.resource, a.subresource)) return false;
  if (r.resource_names.empty()) return true;
  return !a.name.empty() && contains(r.resource_names, a.name);
}

bool subject_matches(const Subject& s, const Binding& b, const Attributes& a) {
  if (s.kind == "User") return s.name == a.user;
  if (s.kind == "Group") return contains(a.groups, s.name);
  if (s.kind == "ServiceAccount") {
    std::string ns = s.namespace_.empty() ? b.namespace_ : s.namespace_;
    return !ns.empty() && a.user == "system:serviceaccount:" + ns + ":" + s.name;
  }
  return false;
}

void add_object(const Node& doc, const std::string& where, std::vector<Role>& roles, std::vector<Binding>& bindings,
                int depth) {
  if (doc.is_null()) return;  // empty document ("---" at the end)
  if (!doc.is_map()) bad(where, "document is not a mapping");
  std::string kind = str_field(doc, "kind", where, false);
  if (kind == "List") {
    if (depth > 2) bad(where, "nested List too deep");
    const Node* items = doc.get("items");
    if (items && !items->is_null() && !items->is_seq()) bad(where, "List items must be a list");
    if (items)
      for (const auto& it : items->items) add_object(it, where, roles, bindings, depth + 1);
    return;
  }
  if (kind != "Role" && kind != "ClusterRole" && kind != "RoleBinding" && kind != "ClusterRoleBinding") return;
  std::string api = str_field(doc, "apiVersion", where, false);
  if (!api.empty() && api.rfind("rbac.authorization.k8s.io/", 0) != 0)
    bad(where, kind + " with apiVersion " + api + " (want rbac.authorization.k8s.io/v1)");
  const Node* md = doc.get("metadata");
  if (!md || !md->is_map()) bad(where, kind + " without metadata");
  std::string name = str_field(*md, "name", where, true);
  std::string ns = str_field(*md, "namespace", where, false);
  std::string here = where + ": " + kind + " " + (ns.empty() ? "" : ns + "/") + name;
  if ((kind == "Role" || kind == "RoleBinding") && ns.empty()) ns = "default";  // kubectl apply's default
  if (kind == "Role" || kind == "ClusterRole") {
    Role r{kind, kind == "Role" ? ns : "", name, {}};
    const Node* rules = doc.get("rules");
    if (rules && !rules->is_null()) {
      if (!rules->is_seq()) bad(here, "rules must be a list");
      for (const auto& rn : rules->items) {
        if (!rn.is_map()) bad(here, "each rule must be a mapping");
        PolicyRule pr{str_list(rn, "verbs", here), str_list(rn, "apiGroups", here), str_list(rn, "resources", here),
                      str_list(rn, "resourceNames", here), str_list(rn, "nonResourceURLs", here)};
        if (pr.verbs.empty()) bad(here, "rule without verbs");
        if (!pr.non_resource_urls.empty()) {
          if (kind == "Role") bad(here, "namespaced rules cannot apply to non-resource URLs");
          if (!pr.resources.empty() || !pr.api_groups.empty())
            bad(here, "rules cannot apply to both regular resources and non-resource URLs");
        }
        r.rules.push_back(std::move(pr));
      }
    }
    roles.push_back(std::move(r));
    return;
  }
  Binding b{kind, kind == "RoleBinding" ? ns : "", name, "", "", {}};
  const Node* ref = doc.get("roleRef");
  if (!ref || !ref->is_map()) bad(here, "missing roleRef");
  b.role_kind = str_field(*ref, "kind", here, true);
  b.role_name = str_field(*ref, "name", here, true);
  if (b.role_kind != "Role" && b.role_kind != "ClusterRole") bad(here, "roleRef.kind must be Role or ClusterRole");
  if (kind == "ClusterRoleBinding" && b.role_kind != "ClusterRole")
    bad(here, "a ClusterRoleBinding may only reference a ClusterRole");
  const Node* subs = doc.get("subjects");
  if (subs && !subs->is_null()) {
    if (!subs->is_seq()) bad(here, "subjects must be a list");
    for (const auto& sn : subs->items) {
      if (!sn.is_map()) bad(here, "each subject must be a mapping");
      Subject s{str_field(sn, "kind", here, true), str_field(sn, "name", here, true),
                str_field(sn, "namespace", here, false)};
      if (s.kind != "User" && s.kind != "Group" && s.kind != "ServiceAccount")
        bad(here, "subject kind must be User, Group or ServiceAccount");
      b.subjects.push_back(std::move(s));
    }
  }
  bindings.push_back(std::move(b));
}

std::string describe(const Attributes& a) {
  if (!a.path.empty()) return "user \"" + a.user + "\" to " + a.verb + " path \"" + a.path + "\"";
  std::string res = a.subresource.empty() ? a.resource : a.resource + "/" + a.subresource;
  if (!a.api_group.empty()) res += "." + a.api_group;
  std::string s = "user \"" + a.user + "\" to " + a.verb + " " + res;
  if (!a.name.empty()) s += " \"" + a.name + "\"";
  s += a.namespace_.empty() ? " at cluster scope" : " in namespace \"" + a.namespace_ + "\"";
  return s;
}

}  // namespace

void Policy::add_yaml(std::string_view yaml, const std::string& source) {
  if (yaml.size() > kMaxPolicyBytes) bad(source, "policy too large");
  std::vector<Role> roles;
  std::vector<Binding> bindings;
  std::vector<Node> docs;
  try {
    docs = yaml::load_all(yaml);
  } catch (const Error& e) {
    bad(source, e.what());
  }
  for (size_t i = 0; i < docs.size(); ++i)
    add_object(docs[i], source + " document " + std::to_string(i + 1), roles, bindings, 0);
  // All or nothing per source.
  for (auto& r : roles) roles_.push_back(std::move(r));
  for (auto& b : bindings) bindings_.push_back(std::move(b));
}

void Policy::load_path(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::string> files;
  if (fs::is_directory(path, ec)) {
    for (const auto& de : fs::directory_iterator(path, ec)) {
      auto ext = de.path().extension().string();
      if (de.is_regular_file() && (ext == ".yaml" || ext == ".yml" || ext == ".json")) files.push_back(de.path());
    }
    if (ec) throw Error("cannot list " + path + ": " + ec.message());
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(path);
  }
  for (const auto& f : files) {
    add_yaml(read_regular_file(f, kMaxPolicyBytes), f);
  }
}

Decision Policy::authorize(const Attributes& a) const {
  if (a.user.empty()) return {false, "anonymous requests are refused"};
  for (const auto& b : bindings_) {
    if (b.kind == "RoleBinding" && b.namespace_ != a.namespace_) continue;
    const Subject* who = nullptr;
    for (const auto& s : b.subjects)
      if (subject_matches(s, b, a)) {
        who = &s;
        break;
      }
    if (!who) continue;
    for (const auto& r : roles_) {
      if (r.kind != b.role_kind || r.name != b.role_name) continue;
      if (r.kind == "Role" && r.namespace_ != b.namespace_) continue;
      for (const auto& rule : r.rules) {
        if (!rule_allows(rule, a)) continue;
        std::string bname = b.kind == "RoleBinding" ? b.namespace_ + "/" + b.name : b.name;
        std::string rname = r.kind == "Role" ? r.namespace_ + "/" + r.name : r.name;
        return {true, "RBAC: allowed by " + b.kind + " \"" + bname + "\" of " + r.kind + " \"" + rname + "\" to " +
                          who->kind + " \"" + who->name + "\""};
      }
    }
  }
  return {false, "no RBAC rule allows " + describe(a)};
}

}  // namespace shimlet::master
