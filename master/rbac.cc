#include "master/rbac.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "common/error.h"

namespace shimlet::master {
namespace {

constexpr size_t kMaxPolicyBytes = 4 << 20;

[[noreturn]] void bad(const std::string& where, const std::string& why) { throw Error(where + ": " + why); }

std::string str_field(const YAML::Node& n, const char* key, const std::string& where, bool required) {
  YAML::Node v = n[key];
  if (!v || v.IsNull()) {
    if (required) bad(where, std::string("missing ") + key);
    return "";
  }
  if (!v.IsScalar()) bad(where, std::string(key) + " must be a string");
  return v.Scalar();
}

std::vector<std::string> str_list(const YAML::Node& n, const char* key, const std::string& where) {
  std::vector<std::string> out;
  YAML::Node v = n[key];
  if (!v || v.IsNull()) return out;
  if (!v.IsSequence()) bad(where, std::string(key) + " must be a list of strings");
  for (const auto& e : v) {
    if (!e.IsScalar()) bad(where, std::string(key) + " must be a list of strings");
    out.push_back(e.Scalar());
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

bool rule_allows(const PolicyRule& r, const Attributes& a) {
  if (!has_or_star(r.verbs, a.verb)) return false;
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

void add_object(const YAML::Node& doc, const std::string& where, std::vector<Role>& roles,
                std::vector<Binding>& bindings, int depth) {
  if (!doc || doc.IsNull()) return;  // empty document ("---" at the end)
  if (!doc.IsMap()) bad(where, "document is not a mapping");
  std::string kind = str_field(doc, "kind", where, false);
  if (kind == "List") {
    if (depth > 2) bad(where, "nested List too deep");
    YAML::Node items = doc["items"];
    if (items && !items.IsSequence()) bad(where, "List items must be a list");
    if (items)
      for (const auto& it : items) add_object(it, where, roles, bindings, depth + 1);
    return;
  }
  if (kind != "Role" && kind != "ClusterRole" && kind != "RoleBinding" && kind != "ClusterRoleBinding") return;
  std::string api = str_field(doc, "apiVersion", where, false);
  if (!api.empty() && api.rfind("rbac.authorization.k8s.io/", 0) != 0)
    bad(where, kind + " with apiVersion " + api + " (want rbac.authorization.k8s.io/v1)");
  YAML::Node md = doc["metadata"];
  if (!md || !md.IsMap()) bad(where, kind + " without metadata");
  std::string name = str_field(md, "name", where, true);
  std::string ns = str_field(md, "namespace", where, false);
  std::string here = where + ": " + kind + " " + (ns.empty() ? "" : ns + "/") + name;
  if ((kind == "Role" || kind == "RoleBinding") && ns.empty()) ns = "default";  // kubectl apply's default
  if (kind == "Role" || kind == "ClusterRole") {
    Role r{kind, kind == "Role" ? ns : "", name, {}};
    YAML::Node rules = doc["rules"];
    if (rules && !rules.IsNull()) {
      if (!rules.IsSequence()) bad(here, "rules must be a list");
      for (const auto& rn : rules) {
        if (!rn.IsMap()) bad(here, "each rule must be a mapping");
        PolicyRule pr{str_list(rn, "verbs", here), str_list(rn, "apiGroups", here), str_list(rn, "resources", here),
                      str_list(rn, "resourceNames", here)};
        if (pr.verbs.empty()) bad(here, "rule without verbs");
        r.rules.push_back(std::move(pr));
      }
    }
    roles.push_back(std::move(r));
    return;
  }
  Binding b{kind, kind == "RoleBinding" ? ns : "", name, "", "", {}};
  YAML::Node ref = doc["roleRef"];
  if (!ref || !ref.IsMap()) bad(here, "missing roleRef");
  b.role_kind = str_field(ref, "kind", here, true);
  b.role_name = str_field(ref, "name", here, true);
  if (b.role_kind != "Role" && b.role_kind != "ClusterRole") bad(here, "roleRef.kind must be Role or ClusterRole");
  if (kind == "ClusterRoleBinding" && b.role_kind != "ClusterRole")
    bad(here, "a ClusterRoleBinding may only reference a ClusterRole");
  YAML::Node subs = doc["subjects"];
  if (subs && !subs.IsNull()) {
    if (!subs.IsSequence()) bad(here, "subjects must be a list");
    for (const auto& sn : subs) {
      if (!sn.IsMap()) bad(here, "each subject must be a mapping");
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
  std::string res = a.subresource.empty() ? a.resource : a.resource + "/" + a.subresource;
  if (!a.api_group.empty()) res += "." + a.api_group;
  std::string s = "user \"" + a.user + "\" to " + a.verb + " " + res;
  if (!a.name.empty()) s += " \"" + a.name + "\"";
  s += a.namespace_.empty() ? " at cluster scope" : " in namespace \"" + a.namespace_ + "\"";
  return s;
}

// True when the text uses a YAML anchor or alias ('&' or '*' outside quotes and
// comments). RBAC manifests never need them (an unquoted "*" is not a valid
// verb anyway), and yaml-cpp 0.7 hangs on some anchor sequences (found by
// master_rbac_fuzz; regression seed tests/fuzz/corpus/master_rbac/anchor-hang).
bool uses_anchors(std::string_view y) {
  bool sq = false, dq = false, comment = false;
  char prev = '\n';
  for (char c : y) {
    if (c == '\n') comment = false;
    if (!comment) {
      if (!dq && c == '\'')
        sq = !sq;
      else if (!sq && c == '"' && prev != '\\')
        dq = !dq;
      else if (!sq && !dq && c == '#' && (prev == ' ' || prev == '\t' || prev == '\n'))
        comment = true;
      else if (!sq && !dq && (c == '&' || c == '*'))
        return true;
    }
    prev = c;
  }
  return false;
}

}  // namespace

void Policy::add_yaml(std::string_view yaml, const std::string& source) {
  if (yaml.size() > kMaxPolicyBytes) bad(source, "policy too large");
  if (uses_anchors(yaml)) bad(source, "YAML anchors and aliases are not supported in RBAC manifests (quote \"*\")");
  std::vector<Role> roles;
  std::vector<Binding> bindings;
  try {
    std::vector<YAML::Node> docs = YAML::LoadAll(std::string(yaml));
    for (size_t i = 0; i < docs.size(); ++i)
      add_object(docs[i], source + " document " + std::to_string(i + 1), roles, bindings, 0);
  } catch (const YAML::Exception& e) {
    bad(source, std::string("invalid YAML: ") + e.what());
  }
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
    std::ifstream in(f, std::ios::binary);
    if (!in) throw Error("cannot read authorization policy " + f);
    std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    add_yaml(data, f);
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
