#include "master/kube.h"

#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <sys/queue.h>

#include <regex>

#include "common/error.h"

namespace shimlet::master::kube {

using nlohmann::json;

namespace {
constexpr size_t kMaxArgs = 4096;
constexpr size_t kMaxCommandBytes = 32 * 1024;

struct QueryFree {
  void operator()(evkeyvalq* q) const { evhttp_clear_headers(q); }
};
}  // namespace

bool parse_bool(std::string_view v, bool* out) {
  // Go's strconv.ParseBool, which the kube-apiserver's query decoding uses.
  for (const char* t : {"1", "t", "T", "TRUE", "true", "True"})
    if (v == t) return *out = true, true;
  for (const char* f : {"0", "f", "F", "FALSE", "false", "False"})
    if (v == f) return *out = false, true;
  return false;
}

ExecParams parse_exec_query(std::string_view query) {
  std::string q(query);
  if (q.find('\0') != std::string::npos) throw Error("malformed query");
  // libevent decodes %00 into a C string, silently truncating the value:
  // refuse it (an argv element cannot hold a NUL anyway).
  for (size_t p = q.find('%'); p != std::string::npos; p = q.find('%', p + 1))
    if (q.compare(p, 3, "%00") == 0) throw Error("command contains a NUL byte");
  evkeyvalq kv;
  TAILQ_INIT(&kv);
  std::unique_ptr<evkeyvalq, QueryFree> guard(&kv);
  if (evhttp_parse_query_str(q.c_str(), &kv) != 0) throw Error("malformed query string");
  ExecParams p;
  size_t total = 0;
  for (evkeyval* e = kv.tqh_first; e; e = e->next.tqe_next) {
    std::string_view k = e->key, v = e->value;
    bool* flag = k == "stdin"    ? &p.stdin_
                 : k == "stdout" ? &p.stdout_
                 : k == "stderr" ? &p.stderr_
                 : k == "tty"    ? &p.tty
                                 : nullptr;
    if (k == "command") {
      if (p.command.size() >= kMaxArgs) throw Error("command has too many arguments");
      total += v.size() + 1;
      if (total > kMaxCommandBytes) throw Error("command is too long");
      p.command.emplace_back(v);
    } else if (k == "container") {
      p.container = v;
    } else if (flag) {
      if (!parse_bool(v, flag)) throw Error("invalid value for " + std::string(k) + ": must be true or false");
    }
  }
  if (p.command.empty()) throw Error("you must specify at least one command for the container");
  if (!p.stdin_ && !p.stdout_ && !p.stderr_) throw Error("you must specify at least one of stdin, stdout, stderr");
  if (p.tty && p.stderr_) p.stderr_ = false;  // as the kubelet: a tty merges stderr into stdout
  return p;
}

json version_json(const std::string& git_version) {
  static const std::regex re(R"(v(\d{1,4})\.(\d{1,4})\.(\d{1,6})([-+][0-9A-Za-z.+-]{0,64})?)");
  std::smatch m;
  if (!std::regex_match(git_version, m, re))
    throw Error("bad Kubernetes version \"" + git_version + "\" (want vX.Y.Z)");
  return {{"major", m[1].str()},       {"minor", m[2].str()},
          {"gitVersion", git_version}, {"gitCommit", "0000000000000000000000000000000000000000"},
          {"gitTreeState", "clean"},   {"buildDate", "2026-01-01T00:00:00Z"},
          {"goVersion", "shimlet"},    {"compiler", "gc"},
          {"platform", "linux/amd64"}};
}

json api_versions(const std::string& server_address) {
  return {{"kind", "APIVersions"},
          {"versions", {"v1"}},
          {"serverAddressByClientCIDRs", {{{"clientCIDR", "0.0.0.0/0"}, {"serverAddress", server_address}}}}};
}

json api_group_list() { return {{"kind", "APIGroupList"}, {"apiVersion", "v1"}, {"groups", json::array()}}; }

json api_v1_resources() {
  auto res = [](const char* name, bool namespaced, const char* kind, json verbs) {
    return json{{"name", name}, {"singularName", ""}, {"namespaced", namespaced}, {"kind", kind}, {"verbs", verbs}};
  };
  json pods = res("pods", true, "Pod", {"get", "list"});
  pods["shortNames"] = {"po"};
  pods["categories"] = {"all"};
  pods["singularName"] = "pod";
  return {{"kind", "APIResourceList"},
          {"apiVersion", "v1"},
          {"groupVersion", "v1"},
          {"resources",
           {pods, res("pods/exec", true, "PodExecOptions", {"create", "get"}),
            res("pods/portforward", true, "PodPortForwardOptions", {"create", "get"})}}};
}

std::string relay_request_head(const Request& req, const std::string& ticket) {
  std::string h = req.method + " " + req.target + " HTTP/1.1\r\n";
  for (const auto& [k, v] : req.headers)
    if (k != "authorization") h += k + ": " + v + "\r\n";
  h += "authorization: Bearer " + ticket + "\r\n\r\n";
  return h;
}

}  // namespace shimlet::master::kube
