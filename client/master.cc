// shimctl's master mode (the default without --local): the connection
// settings from kubectl's flags and kubeconfig files, and the grant requests
// (docs/master-api.md "Grants") that give endpoint + pin + ticket.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>

#include "client/client.h"
#include "common/base64.h"
#include "common/fd.h"
#include "common/yaml.h"
#include "masterclient/masterclient.h"
#include "ticket/ticket.h"

namespace shimlet::client {
namespace {

using nlohmann::json;

constexpr size_t kMaxKubeconfigBytes = 4u << 20;
constexpr size_t kMaxCredentialFileBytes = 1u << 20;
constexpr int kMasterTimeoutMs = 30000;

std::string read_small_file(const std::string& path, size_t max, const std::string& what) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (!fd) throw sys_error("cannot read " + what + " " + path);
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) throw sys_error("fstat " + path);
  if (!S_ISREG(st.st_mode)) throw Error(what + " " + path + ": not a regular file");
  std::string out;
  char buf[16384];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw sys_error("read " + path);
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max) throw Error(what + " " + path + ": larger than " + std::to_string(max) + " bytes");
  }
  return out;
}

// A scalar string field of a YAML map ("" when absent); anything else is an error.
std::string scalar(const yaml::Node& m, const char* key, const std::string& where) {
  const yaml::Node* v = m.get(key);
  if (!v || v->is_null()) return "";
  if (!v->is_scalar()) throw Error(where + ": " + key + " must be a string");
  return v->scalar;
}

std::string resolve(const std::string& path, const std::string& dir) {
  if (path.empty() || path[0] == '/' || dir.empty()) return path;
  if (path[0] == '~' && (path.size() == 1 || path[1] == '/'))
    if (const char* home = std::getenv("HOME")) return home + path.substr(1);
  return dir + "/" + path;
}

std::string decode_data(const std::string& b64, const std::string& what) {
  std::string clean;
  for (char c : b64)
    if (!isspace(static_cast<unsigned char>(c))) clean += c;
  auto d = base64_decode(clean);
  if (!d) throw Error(what + ": not valid base64");
  return *d;
}

// A named list (clusters, users, contexts): first occurrence wins, as kubectl merges.
template <typename T, typename F>
void named_list(const yaml::Node& root, const char* list, const char* inner, std::map<std::string, T>& into,
                const std::string& where, F make) {
  const yaml::Node* l = root.get(list);
  if (!l || l->is_null()) return;
  if (!l->is_seq()) throw Error(where + ": " + list + " must be a list");
  static const yaml::Node kEmptyMap{yaml::Node::Kind::Map, "", false, {}, {}};
  for (const yaml::Node& e : l->items) {
    if (!e.is_map()) throw Error(where + ": " + list + " entries must be maps");
    std::string name = scalar(e, "name", where);
    if (name.empty()) throw Error(where + ": a " + list + " entry has no name");
    const yaml::Node* body = e.get(inner);
    if (body && !body->is_null() && !body->is_map())
      throw Error(where + ": " + list + " " + name + ": " + inner + " must be a map");
    if (into.count(name)) continue;
    into.emplace(name, make(body && body->is_map() ? *body : kEmptyMap, where + ": " + list + " " + name));
  }
}

}  // namespace

void merge_kubeconfig(KubeConfig& kc, std::string_view text, const std::string& path) {
  std::vector<yaml::Node> docs;
  try {
    docs = yaml::load_all(text);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  if (docs.size() > 1) throw Error(path + ": a kubeconfig is one YAML document");
  if (docs.empty() || docs[0].is_null()) return;  // empty file: nothing
  const yaml::Node& root = docs[0];
  if (!root.is_map()) throw Error(path + ": a kubeconfig is a YAML map");
  const std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
  {
    if (kc.current_context.empty()) kc.current_context = scalar(root, "current-context", path);
    named_list(root, "clusters", "cluster", kc.clusters, path, [&](const yaml::Node& c, const std::string& w) {
      KubeConfig::Cluster out;
      out.server = scalar(c, "server", w);
      out.ca_file = resolve(scalar(c, "certificate-authority", w), dir);
      std::string data = scalar(c, "certificate-authority-data", w);
      if (!data.empty()) out.ca_pem = decode_data(data, w + ": certificate-authority-data");
      out.insecure = scalar(c, "insecure-skip-tls-verify", w) == "true";
      return out;
    });
    named_list(root, "users", "user", kc.users, path, [&](const yaml::Node& u, const std::string& w) {
      KubeConfig::User out;
      out.token = scalar(u, "token", w);
      out.token_file = resolve(scalar(u, "tokenFile", w), dir);
      out.cert_file = resolve(scalar(u, "client-certificate", w), dir);
      out.key_file = resolve(scalar(u, "client-key", w), dir);
      std::string cd = scalar(u, "client-certificate-data", w), kd = scalar(u, "client-key-data", w);
      if (!cd.empty()) out.cert_pem = decode_data(cd, w + ": client-certificate-data");
      if (!kd.empty()) out.key_pem = decode_data(kd, w + ": client-key-data");
      if (u.get("exec") || u.get("auth-provider"))
        out.unsupported = "exec/auth-provider credential plugins are not supported";
      return out;
    });
    named_list(root, "contexts", "context", kc.contexts, path, [&](const yaml::Node& c, const std::string& w) {
      KubeConfig::Context out;
      out.cluster = scalar(c, "cluster", w);
      out.user = scalar(c, "user", w);
      out.ns = scalar(c, "namespace", w);
      return out;
    });
  }
}

std::vector<std::string> kubeconfig_paths(const std::string& flag) {
  if (!flag.empty()) return {flag};
  std::vector<std::string> out;
  if (const char* env = std::getenv("KUBECONFIG"); env && *env) {
    std::string s = env;
    size_t start = 0;
    while (start <= s.size()) {
      size_t colon = s.find(':', start);
      std::string p = s.substr(start, colon == std::string::npos ? std::string::npos : colon - start);
      if (!p.empty() && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
      if (colon == std::string::npos) break;
      start = colon + 1;
    }
    return out;
  }
  if (const char* home = std::getenv("HOME"); home && *home) out.push_back(std::string(home) + "/.kube/config");
  return out;
}

masterclient::Masters master_targets(const MasterSettings& s, int timeout_ms, const std::string& prefer) {
  std::vector<masterclient::Target> ts;
  for (const auto& m : s.masters) {
    masterclient::Target t;
    t.server = m.server;
    t.ca_pem = m.ca_pem;
    t.token = m.token;
    t.cert_pem = m.cert_pem;
    t.key_pem = m.key_pem;
    t.timeout_ms = timeout_ms;
    t.user_agent = "shimctl";
    ts.push_back(std::move(t));
  }
  // The preferred one first, the others in their order.
  std::stable_partition(ts.begin(), ts.end(), [&](const masterclient::Target& t) { return t.server == prefer; });
  return masterclient::Masters(std::move(ts));
}

namespace {

// One master's connection settings: flags beat the kubeconfig's cluster and
// user, field by field (kubectl's precedence). `cluster` is only given when
// its server is `server` (another server's CA does not apply).
MasterSettings::Master resolve_master(const MasterFlags& f, const std::string& server,
                                      const KubeConfig::Cluster* cluster, const KubeConfig::User* user) {
  MasterSettings::Master s;
  s.server = server;
  if (!f.ca.empty()) {
    s.ca_pem = read_small_file(f.ca, kMaxCredentialFileBytes, "certificate authority");
  } else if (cluster) {
    if (cluster->insecure)
      throw Error("insecure-skip-tls-verify is not supported: give the master's CA (certificate-authority)");
    if (!cluster->ca_pem.empty())
      s.ca_pem = cluster->ca_pem;
    else if (!cluster->ca_file.empty())
      s.ca_pem = read_small_file(cluster->ca_file, kMaxCredentialFileBytes, "certificate authority");
  }
  const bool flag_cert = !f.client_cert.empty() || !f.client_key.empty();
  if (flag_cert && (f.client_cert.empty() || f.client_key.empty()))
    throw UsageError("--client-certificate and --client-key go together");
  if (!f.token.empty()) {
    s.token = f.token;
  } else if (user && !flag_cert) {
    if (!user->unsupported.empty() && user->token.empty() && user->token_file.empty() && user->cert_pem.empty() &&
        user->cert_file.empty())
      throw Error(user->unsupported);
    s.token = user->token;
    if (s.token.empty() && !user->token_file.empty()) {
      s.token = read_small_file(user->token_file, 64 * 1024, "token file");
      while (!s.token.empty() && isspace(static_cast<unsigned char>(s.token.back()))) s.token.pop_back();
    }
  }
  if (flag_cert) {
    s.cert_pem = read_small_file(f.client_cert, kMaxCredentialFileBytes, "client certificate");
    s.key_pem = read_small_file(f.client_key, kMaxCredentialFileBytes, "client key");
  } else if (user && f.token.empty()) {
    s.cert_pem = !user->cert_pem.empty() ? user->cert_pem
                 : !user->cert_file.empty()
                     ? read_small_file(user->cert_file, kMaxCredentialFileBytes, "client certificate")
                     : "";
    s.key_pem = !user->key_pem.empty()    ? user->key_pem
                : !user->key_file.empty() ? read_small_file(user->key_file, kMaxCredentialFileBytes, "client key")
                                          : "";
  }
  if (s.token.empty() && s.cert_pem.empty())
    throw UsageError("no credential for the master at " + s.server +
                     ": use --token, --client-certificate/--client-key, or a kubeconfig user");
  return s;
}

}  // namespace

MasterSettings master_settings(const Invocation& inv) {
  const MasterFlags& f = inv.master;
  KubeConfig kc;
  std::string sources;
  for (const std::string& p : kubeconfig_paths(f.kubeconfig)) {
    // --kubeconfig must exist; $KUBECONFIG entries and ~/.kube/config may not (kubectl's rule).
    if (f.kubeconfig.empty() && ::access(p.c_str(), F_OK) != 0) continue;
    merge_kubeconfig(kc, read_small_file(p, kMaxKubeconfigBytes, "kubeconfig"), p);
    sources += (sources.empty() ? "" : ":") + p;
  }
  MasterSettings s;
  s.source = sources;
  std::vector<std::string> names = f.contexts;
  if (names.empty() && !kc.current_context.empty()) names.push_back(kc.current_context);
  struct Ctx {
    const KubeConfig::Cluster* cluster = nullptr;
    const KubeConfig::User* user = nullptr;
  };
  std::vector<Ctx> ctxs;
  for (const std::string& name : names) {
    auto c = kc.contexts.find(name);
    if (c == kc.contexts.end()) {
      if (!f.contexts.empty() || f.servers.empty())
        throw Error("context \"" + name + "\" not found in " + (sources.empty() ? "any kubeconfig" : sources));
      continue;
    }
    if (ctxs.empty()) s.ns = c->second.ns;
    Ctx x;
    if (auto cl = kc.clusters.find(c->second.cluster); cl != kc.clusters.end())
      x.cluster = &cl->second;
    else if (f.servers.empty())
      throw Error("cluster \"" + c->second.cluster + "\" of context \"" + name + "\" not found in " + sources);
    if (auto u = kc.users.find(c->second.user); u != kc.users.end()) x.user = &u->second;
    ctxs.push_back(x);
  }
  if (!f.servers.empty()) {
    for (const std::string& server : f.servers) {
      // The context whose cluster is this server lends its CA and user; the
      // first context its user otherwise.
      Ctx x;
      if (!ctxs.empty()) x.user = ctxs.front().user;
      for (const Ctx& c : ctxs)
        if (c.cluster && c.cluster->server == server) {
          x = c;
          break;
        }
      s.masters.push_back(resolve_master(f, server, x.cluster, x.user));
    }
  } else {
    for (const Ctx& c : ctxs)
      if (c.cluster && !c.cluster->server.empty())
        s.masters.push_back(resolve_master(f, c.cluster->server, c.cluster, c.user));
  }
  if (s.masters.empty())
    throw UsageError(
        "no master configured: use --server (with --token or --client-certificate/--client-key), a kubeconfig "
        "(--kubeconfig, $KUBECONFIG, ~/.kube/config), or --local as root on the node");
  return s;
}

namespace {

// POST the grant request and turn the answer into a Grant; a refusal becomes
// one error line with the master's Status message.
Grant request_grant(const Invocation& inv, const std::string& pod, const std::string& verb, json body,
                    const proto::Identity& client) {
  MasterSettings s = master_settings(inv);
  const std::string ns = inv.ns_set || s.ns.empty() ? inv.ns : s.ns;
  masterclient::Masters masters = master_targets(s, kMasterTimeoutMs);
  // Bind the ticket to this run's TLS key (cnf.jkt): the shim checks it.
  body["jkt"] = proto::jkt_of_identity(client);
  const std::string path = "/apis/shimlet.io/v1/namespaces/" + masterclient::path_segment(ns) + "/pods/" +
                           masterclient::path_segment(pod) + "/" + verb;
  masterclient::Response r = masters.request("POST", path, body.dump());
  if (r.status != 201 && r.status != 200) throw Error(masterclient::error_message(r));
  json g = json::parse(r.body, nullptr, false);
  auto field = [&](const char* k) {
    if (!g.is_object() || !g.contains(k) || !g[k].is_string() || g[k].get<std::string>().empty() ||
        g[k].get<std::string>().size() > 64 * 1024)
      throw Error(std::string("the master's grant has no valid \"") + k + "\"");
    return g[k].get<std::string>();
  };
  Grant out;
  out.container_id = field("container_id");
  out.endpoint = field("endpoint");
  out.pin = field("pin");
  out.ticket = field("ticket");
  if (out.pin.rfind("sha256/", 0) != 0) throw Error("the master's grant has a malformed pin");
  // The tunnel names the pod and container; the master looks the endpoint up
  // itself (never from us), and the pin above still authenticates the shim.
  out.tunnel_path = "/apis/shimlet.io/v1/namespaces/" + masterclient::path_segment(ns) + "/pods/" +
                    masterclient::path_segment(pod) +
                    "/tunnel?container=" + masterclient::path_segment(field("container"));
  out.master = masters.current().server;
  out.proxy = inv.proxy;
  out.inv = &inv;
  return out;
}

}  // namespace

Grant master_exec_grant(const Invocation& inv, const proto::Identity& client) {
  json body = {{"command", inv.exec.command}, {"stdin", inv.exec.stdin_}, {"tty", inv.exec.tty}};
  if (!inv.exec.container.empty()) body["container"] = inv.exec.container;
  return request_grant(inv, inv.exec.target, "exec", std::move(body), client);
}

Grant master_portforward_grant(const Invocation& inv, const proto::Identity& client) {
  json ports = json::array();
  for (const PortSpec& p : inv.pf.ports) {
    json e = {{"port", p.remote}, {"proto", p.udp ? "udp" : "tcp"}};
    if (std::find(ports.begin(), ports.end(), e) == ports.end()) ports.push_back(e);
  }
  json body = {{"ports", ports}};
  if (!inv.pf.container.empty()) body["container"] = inv.pf.container;
  return request_grant(inv, inv.pf.target, "portforward", std::move(body), client);
}

}  // namespace shimlet::client
