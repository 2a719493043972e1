// Context: what every front door of a session shares (docs/design.md
// "Processes"): the config from shim.json, the peer, the session's id, and
// the end record written when it goes (session_end_record.cc).
#include "session/session_context.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "common/base64.h"
#include "common/error.h"
#include "common/file.h"
#include "common/log.h"
#include "session/session_recording.h"
#include "shim/session_proto.h"

namespace shimlet::session {

std::string peer_of(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return "?";
  if (ss.ss_family == AF_UNIX) {
    ucred cr{};
    socklen_t cl = sizeof cr;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0) return "unix:?";
    return "unix:pid=" + std::to_string(cr.pid) + ",uid=" + std::to_string(cr.uid);
  }
  char host[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    port = ntohs(a->sin6_port);
  }
  return std::string(host) + ":" + std::to_string(port);
}

Config load_config(const std::string& path) {
  auto j = nlohmann::json::parse(read_regular_file(path, 1 << 20));
  Config c;
  c.id = j.at("id").get<std::string>();
  c.pid = j.at("pid").get<pid_t>();
  c.bundle = j.at("bundle").get<std::string>();
  c.node = j.value("node", std::string());
  c.ns = j.value("namespace", std::string());
  c.pod = j.value("pod", std::string());
  c.container = j.value("container", std::string());
  for (auto& k : j.value("trusted_keys", nlohmann::json::array()))
    c.keys.push_back({k.at("kid").get<std::string>(), ticket::PublicKey::from_pem(k.at("pem").get<std::string>())});
  c.max_ticket_lifetime_s = j.value("max_ticket_lifetime_s", c.max_ticket_lifetime_s);
  c.clock_leeway_s = j.value("clock_leeway_s", c.clock_leeway_s);
  c.drain_timeout_ms = j.value("drain_timeout_ms", c.drain_timeout_ms);
  c.tls_cert = j.at("tls_cert").get<std::string>();
  c.tls_key = j.at("tls_key").get<std::string>();
  c.ends_dir = j.value("ends_dir", std::string());
  c.isolation = parse_isolation(j.value("isolation", nlohmann::json()));
  c.preauth_timeout_ms = j.value("preauth_timeout_ms", c.preauth_timeout_ms);
  c.preauth_max_connections = j.value("preauth_max_connections", c.preauth_max_connections);
  c.preauth_max_per_source = j.value("preauth_max_per_source", c.preauth_max_per_source);
  c.preauth_max_memory = j.value("preauth_max_memory", c.preauth_max_memory);
  c.recording = parse_recording_settings(j.value("recording", nlohmann::json::object()));
  return c;
}

Context::Context(event_base* base, Config cfg, nsenter::Container ctr, int conn_fd, int shim_fd, int report_fd)
    : base_(base), cfg_(std::move(cfg)), ctr_(std::move(ctr)), shim_fd_(shim_fd), report_fd_(report_fd) {
  sid_ = hex_encode(random_bytes(8));
  own_netns_ = Fd(::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC));
  if (!own_netns_) throw sys_error("open /proc/self/ns/net");
  peer_ = peer_of(conn_fd);
  start_unix_ = time(nullptr);
  log::set_context({{"container", cfg_.id}, {"session", sid_}, {"peer", peer_}});
}

Context::~Context() {
  // A destructor must not throw; a lost record is logged (the shim.log audit
  // line "session.end" still has the session).
  try {
    write_end_record();
  } catch (const std::exception& e) {
    log::error("cannot write the session end record", {{"dir", cfg_.ends_dir}, {"error", e.what()}});
  }
  report_end();
}

// The session's result as the shim counts it (shim/session_proto.h), with
// the end record's byte counts; one datagram, the session's last word.
void Context::report_end() const {
  if (report_fd_ < 0) return;
  using session_end::Result;
  session_end::Report r;
  Result result = !end_claims_                 ? Result::Refused
                  : !end_error_.empty()        ? Result::Error
                  : end_exit_.value_or(0) != 0 ? Result::ExitNonzero
                                               : Result::Ok;
  r.result = static_cast<uint8_t>(result);
  r.bytes_in = end_bytes_in_;
  r.bytes_out = end_bytes_out_;
  if (::send(report_fd_, &r, sizeof r, MSG_DONTWAIT | MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof r))
    log::warn("cannot send the shim the session's end report", {{"error", strerror(errno)}});
}

}  // namespace shimlet::session
