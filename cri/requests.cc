#include "cri/requests.h"

#include <limits>

#include "hook/hook.h"

namespace shimlet::cri {

std::optional<ExecPlan> plan_exec(const runtime::v1::ExecRequest& r) {
  if (!hook::valid_container_id(r.container_id()) || r.cmd().empty()) return std::nullopt;
  if (r.tty() && r.stderr()) return std::nullopt;
  if (!r.stdin() && !r.stdout() && !r.stderr()) return std::nullopt;
  ExecPlan p;
  p.cmd.assign(r.cmd().begin(), r.cmd().end());
  p.tty = r.tty();
  p.stdin_ = r.stdin();
  p.stdout_ = r.stdout();
  p.stderr_ = r.stderr();
  return p;
}

ticket::Claims exec_claims(const ExecPlan& p) {
  client::ExecOptions ex;
  ex.command = p.cmd;
  ex.stdin_ = p.stdin_;
  ex.tty = p.tty;
  return client::exec_claims(ex);
}

std::string exec_url(const std::string& cri_endpoint, const std::string& ticket, const ExecPlan& p) {
  std::string url = "http://" + cri_endpoint + "/exec/" + ticket;
  std::string q;
  if (!p.stdout_) q += "stdout=false";
  if (!p.tty && !p.stderr_) q += std::string(q.empty() ? "" : "&") + "stderr=false";
  return q.empty() ? url : url + "?" + q;
}

std::optional<std::vector<ticket::Port>> plan_port_forward(const runtime::v1::PortForwardRequest& r) {
  if (!hook::valid_container_id(r.pod_sandbox_id())) return std::nullopt;
  std::vector<ticket::Port> ports;
  for (int32_t p : r.port()) {
    if (p < 1 || p > 65535) return std::nullopt;
    ticket::Port tp{static_cast<uint16_t>(p), "tcp"};
    bool seen = false;
    for (const auto& q : ports) seen = seen || q == tp;
    if (!seen) ports.push_back(tp);
  }
  if (ports.empty()) ports.push_back({0, "tcp"});
  return ports;
}

ticket::Claims port_forward_claims(const std::vector<ticket::Port>& ports) {
  ticket::Claims c;
  c.verb = "portforward";
  c.ports = ports;
  return c;
}

std::string port_forward_url(const std::string& cri_endpoint, const std::string& ticket) {
  return "http://" + cri_endpoint + "/portforward/" + ticket;
}

std::optional<ExecSyncPlan> plan_exec_sync(const runtime::v1::ExecSyncRequest& r) {
  if (!hook::valid_container_id(r.container_id()) || r.cmd().empty() || r.timeout() < 0) return std::nullopt;
  // A timeout beyond what the exec's timer holds (an int of milliseconds,
  // 24.8 days) is no timeout in practice.
  constexpr int64_t kMaxTimeoutS = std::numeric_limits<int>::max() / 1000;
  ExecSyncPlan p;
  p.cmd.assign(r.cmd().begin(), r.cmd().end());
  p.timeout_ms = r.timeout() > kMaxTimeoutS ? 0 : r.timeout() * 1000;
  return p;
}

std::string go_duration(int64_t s) {
  if (s == 0) return "0s";
  int64_t h = s / 3600, m = s / 60 % 60, sec = s % 60;
  if (h) return std::to_string(h) + "h" + std::to_string(m) + "m" + std::to_string(sec) + "s";
  if (m) return std::to_string(m) + "m" + std::to_string(sec) + "s";
  return std::to_string(sec) + "s";
}

std::string exec_sync_timeout_message(int64_t timeout_s) {
  return "failed to exec in container: timeout " + go_duration(timeout_s) + " exceeded: context deadline exceeded";
}

const client::Registration* pick_pod_target(const std::vector<client::Registration>& live,
                                            const std::string& sandbox_id) {
  const client::Registration* best = nullptr;
  for (const auto& r : live) {
    if (r.cri_endpoint.empty()) continue;
    if (r.id == sandbox_id) return &r;  // the sandbox's own shim
    if (r.sandbox_id == sandbox_id && !r.sandbox && (!best || r.id < best->id)) best = &r;
  }
  return best;
}

}  // namespace shimlet::cri
