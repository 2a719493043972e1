// The hook config: parsed strictly (bounded, typed, ranges, unknown keys
// refused so that typos are not silently ignored).
#include <arpa/inet.h>
#include <stdio.h>
#include <unistd.h>

#include <cctype>

#include "common/error.h"
#include "common/file.h"
#include "hook/internal.h"
#include "masterclient/masterclient.h"

namespace shimlet::hook {
namespace {

using nlohmann::json;

// master.node / container ids as the master accepts them ([A-Za-z0-9][A-Za-z0-9_.-]{0,127}).
bool valid_node(std::string_view n) {
  if (n.empty() || n.size() > 128 || !isalnum(static_cast<unsigned char>(n[0]))) return false;
  for (char ch : n)
    if (!isalnum(static_cast<unsigned char>(ch)) && ch != '_' && ch != '.' && ch != '-') return false;
  return true;
}

// "127.x.y.z:PORT" or "[::1]:PORT" (PORT 0..65535).
bool loopback_hostport(const std::string& hp) {
  auto colon = hp.rfind(':');
  if (colon == std::string::npos || colon + 1 == hp.size() || hp.size() - colon - 1 > 5) return false;
  for (size_t i = colon + 1; i < hp.size(); i++)
    if (hp[i] < '0' || hp[i] > '9') return false;
  if (std::stoul(hp.substr(colon + 1)) > 65535) return false;
  std::string host = hp.substr(0, colon);
  if (host == "[::1]") return true;
  in_addr a{};
  return inet_pton(AF_INET, host.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

template <typename Str, typename Path, typename Num>
MasterConfig parse_master(const json& v, Str str, Path abs_path, Num num) {
  if (!v.is_object()) throw Error("hook config: master must be an object");
  MasterConfig m;
  for (auto& [k, e] : v.items()) {
    const std::string key = "master." + k;
    if (k == "url") {
      // One URL, or a list of masters tried in order.
      if (e.is_array()) {
        if (e.empty() || e.size() > 16) throw Error("hook config: master.url: a list of 1..16 URLs");
        for (const auto& u : e) m.urls.push_back(str(u, key));
      } else {
        m.urls.push_back(str(e, key));
      }
      for (const auto& u : m.urls) try {
          masterclient::parse_url(u);
        } catch (const Error& err) {
          throw Error("hook config: " + key + ": " + err.what());
        }
    } else if (k == "node") {
      m.node = str(e, key);
      if (!valid_node(m.node)) throw Error("hook config: master.node must match [A-Za-z0-9][A-Za-z0-9_.-]{0,127}");
    } else if (k == "ca") {
      m.ca = abs_path(e, key);
    } else if (k == "token") {
      m.token = str(e, key);
      if (m.token.empty() || m.token.size() > 4096) throw Error("hook config: master.token must be 1..4096 chars");
      for (unsigned char ch : m.token)
        if (ch <= 0x20 || ch == 0x7f) throw Error("hook config: master.token contains spaces or control characters");
    } else if (k == "token_file") {
      m.token_file = abs_path(e, key);
    } else if (k == "client_cert") {
      m.client_cert = abs_path(e, key);
    } else if (k == "client_key") {
      m.client_key = abs_path(e, key);
    } else if (k == "timeout_ms") {
      m.timeout_ms = static_cast<int>(num(e, key, 100, 60000));
    } else if (k == "renew_interval_s") {
      m.renew_interval_s = static_cast<int>(num(e, key, 1, 3600));
    } else {
      throw Error("hook config: master: unknown key " + k);
    }
  }
  if (m.urls.empty()) throw Error("hook config: master.url is required");
  int creds = !m.token.empty() + !m.token_file.empty() + (!m.client_cert.empty() || !m.client_key.empty());
  if (creds != 1)
    throw Error("hook config: master needs exactly one credential: token, token_file, or client_cert + client_key");
  if (m.client_cert.empty() != m.client_key.empty())
    throw Error("hook config: master.client_cert and master.client_key go together");
  if (m.node.empty()) {
    char host[256] = {};
    if (::gethostname(host, sizeof host - 1) < 0 || !valid_node(host))
      throw Error("hook config: master.node is required (the host name is not usable as a node name)");
    m.node = host;
  }
  return m;
}

json parse_isolation(const json& v) {
  auto num = [](const json& x, const std::string& k, uint64_t lo, uint64_t hi) {
    if (!x.is_number_unsigned() || x.get<uint64_t>() < lo || x.get<uint64_t>() > hi)
      throw Error("hook config: " + k + " must be an integer in " + std::to_string(lo) + ".." + std::to_string(hi));
  };
  if (!v.is_object()) throw Error("hook config: isolation must be an object");
  for (auto& [k, x] : v.items()) {
    if (k == "cgroup" || k == "selinux") {
      if (!x.is_boolean()) throw Error("hook config: isolation." + k + " must be a boolean");
    } else if (k == "landlock") {
      if (!x.is_string() || (x != "strict" && x != "compat" && x != "off"))
        throw Error("hook config: isolation.landlock must be \"strict\", \"compat\" or \"off\"");
    } else if (k == "selinux_categories") {
      // cA.cB or cA-cB inside c0..c1023 (checked again by the session's parser).
      std::string s = x.is_string() ? x.get<std::string>() : "";
      unsigned a = 0, b = 0;
      char sep = 0, c1 = 0, c2 = 0;
      int used = 0;
      if (s.size() > 16 || sscanf(s.c_str(), "%c%u%c%c%u%n", &c1, &a, &sep, &c2, &b, &used) != 5 ||
          used != static_cast<int>(s.size()) || c1 != 'c' || c2 != 'c' || (sep != '.' && sep != '-') || a > b ||
          b > 1023)
        throw Error("hook config: isolation.selinux_categories must be cA.cB with A <= B <= 1023");
    } else if (k == "limits" || k == "max_limits") {
      if (!x.is_object()) throw Error("hook config: isolation." + k + " must be an object");
      for (auto& [lk, lv] : x.items()) {
        std::string name = "isolation." + k + "." + lk;
        if (lk == "pids")
          num(lv, name, 0, 4194304);
        else if (lk == "memory")
          num(lv, name, 0, uint64_t{1} << 50);
        else if (lk == "cpu_weight")
          num(lv, name, 0, 10000);
        else
          throw Error("hook config: isolation." + k + ": unknown key " + lk);
      }
    } else {
      throw Error("hook config: isolation: unknown key " + k);
    }
  }
  return v;
}

}  // namespace

bool valid_container_id(std::string_view id) {
  if (id.empty() || id.size() > 128 || id == "." || id == "..") return false;
  for (char c : id)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' ||
          c == '-'))
      return false;
  return true;
}

std::optional<Stage> stage_from_name(std::string_view n) {
  if (n == "createRuntime" || n == "createContainer" || n == "prestart") return Stage::Start;
  if (n == "poststop") return Stage::Cleanup;
  return std::nullopt;
}

std::optional<Stage> stage_from_status(std::string_view s) {
  if (s == "creating" || s == "created") return Stage::Start;
  if (s == "stopped") return Stage::Cleanup;
  return std::nullopt;
}

Config parse_config(std::string_view text, const std::string& dir) {
  if (text.size() > kMaxConfigBytes)
    throw Error("hook config: " + std::to_string(text.size()) + " bytes exceeds the limit of " +
                std::to_string(kMaxConfigBytes));
  json j;
  try {
    // Depth-bounded: nothing legitimate nests deeper than 3.
    j = json::parse(text.begin(), text.end(), [](int depth, json::parse_event_t, json&) {
      if (depth > 8) throw Error("hook config: nested too deeply");
      return true;
    });
  } catch (const json::exception& e) {
    throw Error(std::string("hook config: invalid JSON: ") + e.what());
  }
  if (!j.is_object()) throw Error("hook config: expected a JSON object");
  Config c;
  c.shim_binary = dir + "/shimlet";
  c.session_binary = dir + "/shimlet-session";
  auto str = [](const json& v, const std::string& k) {
    if (!v.is_string()) throw Error("hook config: " + k + " must be a string");
    return v.get<std::string>();
  };
  auto abs_path = [&](const json& v, const std::string& k) {
    std::string s = str(v, k);
    if (s.empty() || s[0] != '/' || s.size() > 1024 || s.find('\0') != std::string::npos)
      throw Error("hook config: " + k + " must be an absolute path");
    return s;
  };
  auto num = [](const json& v, const std::string& k, int64_t lo, int64_t hi) {
    if (!v.is_number_integer()) throw Error("hook config: " + k + " must be an integer");
    int64_t x = v.is_number_unsigned() ? (v.get<uint64_t>() > static_cast<uint64_t>(hi) ? hi + 1 : v.get<int64_t>())
                                       : v.get<int64_t>();
    if (x < lo || x > hi)
      throw Error("hook config: " + k + " must be in " + std::to_string(lo) + ".." + std::to_string(hi));
    return x;
  };
  for (auto& [k, v] : j.items()) {
    if (k == "state_dir") {
      c.state_dir = abs_path(v, k);
      while (c.state_dir.size() > 1 && c.state_dir.back() == '/') c.state_dir.pop_back();
    } else if (k == "shim_binary") {
      c.shim_binary = abs_path(v, k);
    } else if (k == "session_binary") {
      c.session_binary = abs_path(v, k);
    } else if (k == "listen") {
      c.listen = str(v, k);
      if (c.listen.size() > 64 || c.listen.find(':') == std::string::npos)
        throw Error("hook config: listen must be HOST:PORT (e.g. 127.0.0.1:0)");
    } else if (k == "cri_listen") {
      c.cri_listen = str(v, k);
      if (!c.cri_listen.empty() && !loopback_hostport(c.cri_listen))
        throw Error("hook config: cri_listen must be a loopback IP:PORT (127.0.0.1:0 or [::1]:0): plain HTTP");
    } else if (k == "trusted_keys") {
      if (!v.is_array() || v.size() > 64) throw Error("hook config: trusted_keys must be an array (at most 64)");
      for (const auto& e : v) {
        KeyRef r;
        if (e.is_string()) {
          r.path = abs_path(e, "trusted_keys[]");
          std::string base = r.path.substr(r.path.rfind('/') + 1);
          auto dot = base.rfind('.');
          r.kid = dot == std::string::npos || dot == 0 ? base : base.substr(0, dot);
        } else if (e.is_object()) {
          for (auto& [ek, ev] : e.items()) {
            if (ek == "kid")
              r.kid = str(ev, "trusted_keys[].kid");
            else if (ek == "path")
              r.path = abs_path(ev, "trusted_keys[].path");
            else
              throw Error("hook config: trusted_keys[]: unknown key " + ek);
          }
          if (r.path.empty()) throw Error("hook config: trusted_keys[] needs a path");
        } else {
          throw Error("hook config: trusted_keys[] must be a path or {\"kid\",\"path\"}");
        }
        if (r.kid.empty() || r.kid.size() > 128 || r.kid == "local")
          throw Error("hook config: trusted key id must be 1..128 chars and not \"local\": " + r.kid);
        c.trusted_keys.push_back(std::move(r));
      }
    } else if (k == "master") {
      c.master = parse_master(v, str, abs_path, num);
    } else if (k == "isolation") {
      c.isolation = parse_isolation(v);
    } else if (k == "recording") {
      c.recording = parse_recording(v);
    } else if (k == "fail_container_on_error") {
      if (!v.is_boolean()) throw Error("hook config: fail_container_on_error must be a boolean");
      c.fail_container_on_error = v.get<bool>();
    } else if (k == "ready_timeout_ms") {
      c.ready_timeout_ms = static_cast<int>(num(v, k, 1, 60000));
    } else if (k == "max_ticket_lifetime_s") {
      c.max_ticket_lifetime_s = num(v, k, 1, 86400);
    } else if (k == "clock_leeway_s") {
      c.clock_leeway_s = num(v, k, 0, 3600);
    } else if (k == "drain_timeout_ms") {
      c.drain_timeout_ms = static_cast<int>(num(v, k, 0, 600000));
    } else if (k == "max_sessions") {
      c.max_sessions = static_cast<int>(num(v, k, 1, 65536));
    } else if (k == "max_local_sessions") {
      c.max_local_sessions = static_cast<int>(num(v, k, 1, 65536));
    } else if (k == "preauth_timeout_ms") {
      c.preauth_timeout_ms = static_cast<int>(num(v, k, 100, 60000));
    } else if (k == "preauth_max_connections") {
      c.preauth_max_connections = static_cast<int>(num(v, k, 1, 65536));
    } else if (k == "preauth_max_per_source") {
      c.preauth_max_per_source = static_cast<int>(num(v, k, 1, 65536));
    } else if (k == "preauth_max_memory") {
      c.preauth_max_memory = num(v, k, 1 << 20, int64_t{1} << 34);
    } else if (k == "warm_idle_s") {
      c.warm_idle_s = static_cast<int>(num(v, k, 0, 3600));
    } else {
      throw Error("hook config: unknown key " + k);
    }
  }
  return c;
}

Config load_config(const std::string& path, const std::string& dir) {
  return parse_config(read_regular_file(path, kMaxConfigBytes), dir);
}

}  // namespace shimlet::hook
