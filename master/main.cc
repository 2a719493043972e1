// shimlet-master: flags in kube-apiserver's style; everything else in the library.
#include <event2/event.h>
#include <openssl/ssl.h>
#include <signal.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "common/error.h"
#include "common/event.h"
#include "common/file.h"
#include "common/log.h"
#include "common/openssl.h"
#include "common/version.h"
#include "master/master.h"
#include "master/registry_etcd.h"
#include "master/systemd.h"
#include "proto/tls.h"

using namespace shimlet;

namespace {

constexpr size_t kMaxPemFileBytes = 1 << 20;  // a serving certificate chain or its key

// Go-style durations as kube-apiserver takes them ("90s", "2m", "1h"); a bare number is seconds.
int64_t parse_duration_s(const std::string& s) {
  size_t pos = 0;
  int64_t total = 0;
  if (s.empty()) throw Error("empty duration");
  while (pos < s.size()) {
    size_t start = pos;
    while (pos < s.size() && isdigit(static_cast<unsigned char>(s[pos]))) ++pos;
    if (start == pos || pos - start > 9) throw Error("bad duration " + s);
    int64_t n = std::stoll(s.substr(start, pos - start));
    char unit = pos < s.size() ? s[pos++] : 's';
    if (unit == 'h')
      n *= 3600;
    else if (unit == 'm')
      n *= 60;
    else if (unit != 's')
      throw Error("bad duration unit in " + s);
    total += n;
  }
  if (total <= 0) throw Error("duration must be positive: " + s);
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  log::set_component("master");
  master::Config cfg;
  std::string lease = "60s", ticket_life = "60s";
  std::string etcd_servers, etcd_compaction = "5m", etcd_staleness = "10s", etcd_timeout = "5s";
  master::EtcdOptions etcd_opt;
  bool print_pub = false;
  CLI::App app{
      "shimlet-master: authenticates, authorizes and audits exec/port-forward, then sends clients to the shim"};
  app.set_version_flag("--version", "shimlet-master " SHIMLET_VERSION, "Print the version and exit");
  // Every flag may come from a file instead (the packaged unit: /etc/shimlet/master.conf);
  // unknown keys are refused so that a typo is not silently ignored.
  app.set_config("--config", "", "Read flags from this file: one 'flag-name = value' per line (TOML)");
  app.allow_config_extras(false);
  app.add_option("--bind-address", cfg.bind_address, "IP address to listen on")->capture_default_str();
  app.add_option("--secure-port", cfg.secure_port, "HTTPS port (0 = ephemeral)")->capture_default_str();
  app.add_option("--tls-cert-file", cfg.tls_cert_file, "serving certificate (PEM, may include intermediates)");
  app.add_option("--tls-private-key-file", cfg.tls_private_key_file, "serving private key (PEM)");
  app.add_option("--client-ca-file", cfg.client_ca_file, "CA bundle for client certificates (CN = user, O = groups)");
  app.add_option("--token-auth-file", cfg.token_auth_file, "static tokens: token,user,uid,\"group1,group2\"");
  app.add_option("--authorization-policy-file", cfg.authorization_policy_files,
                 "RBAC YAML (Role, ClusterRole, RoleBinding, ClusterRoleBinding); file or directory, repeatable");
  app.add_option("--audit-log-path", cfg.audit_log_path, "audit log (JSON lines), '-' for stdout");
  app.add_option("--ticket-signing-key-file", cfg.ticket_signing_key_file, "Ed25519 private key (PEM) for tickets")
      ->required();
  app.add_option("--ticket-key-id", cfg.ticket_key_id, "kid in ticket headers (shims' trusted_keys name)")
      ->capture_default_str();
  app.add_option("--issuer", cfg.issuer, "iss claim of tickets")->capture_default_str();
  app.add_option("--lease-duration", lease, "registration lease (e.g. 60s, 2m)")->capture_default_str();
  app.add_option("--ticket-lifetime", ticket_life, "ticket validity (≤ the shims' max_ticket_lifetime_s)")
      ->capture_default_str();
  app.add_option("--kube-version", cfg.kube_version,
                 "gitVersion served at /version (kubectl's dispatcher picks its client version by it)")
      ->capture_default_str();
  app.add_option("--max-request-body-bytes", cfg.limits.max_body_bytes)->capture_default_str();
  app.add_option("--max-request-header-bytes", cfg.limits.max_header_bytes)->capture_default_str();
  app.add_option("--request-timeout", cfg.limits.request_timeout_s, "seconds for a request to arrive")
      ->capture_default_str();
  app.add_option("--max-connections", cfg.limits.max_connections)->capture_default_str();
  app.add_option("--recording-policy-file", cfg.recording_policy_file,
                 "which exec sessions the shims record (RecordingPolicy YAML, docs/recording.md)");
  app.add_option("--recording-dir", cfg.recording_dir, "where the master keeps the recordings nodes upload");
  app.add_option("--recording-max-bytes", cfg.recording_max_bytes, "largest recording accepted")->capture_default_str();
  app.add_flag("--print-ticket-public-key", print_pub, "print the ticket public key (PEM) for shims, then exit");
  // The registry in etcd (kube-apiserver's flag names where it has one;
  // docs/design.md "Registry in etcd"). Without --etcd-servers: in memory.
  app.add_option("--etcd-servers", etcd_servers,
                 "etcd members (comma-separated https://HOST:PORT): keep the registry there, shared by every master "
                 "(default: in this process's memory)");
  app.add_option("--etcd-cafile", etcd_opt.client.ca_file, "CA bundle that verifies the etcd members (PEM)");
  app.add_option("--etcd-certfile", etcd_opt.client.cert_file, "client certificate for etcd (PEM)");
  app.add_option("--etcd-keyfile", etcd_opt.client.key_file, "key of --etcd-certfile (PEM)");
  app.add_option("--etcd-prefix", etcd_opt.prefix, "key prefix in etcd")->capture_default_str();
  app.add_option("--etcd-compaction-interval", etcd_compaction,
                 "compact etcd's history this often (one master per round); 0 = never")
      ->capture_default_str();
  app.add_option("--etcd-max-cache-staleness", etcd_staleness,
                 "refuse grants (503) when the registry copy has not been confirmed current for this long")
      ->capture_default_str();
  app.add_option("--etcd-request-timeout", etcd_timeout, "deadline of each etcd call, all members tried")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  try {
    if (print_pub) {
      std::cout << ticket::PrivateKey::load(cfg.ticket_signing_key_file).public_pem();
      return 0;
    }
    if (cfg.tls_cert_file.empty() || cfg.tls_private_key_file.empty())
      throw Error("--tls-cert-file and --tls-private-key-file are required");
    cfg.lease_duration_s = parse_duration_s(lease);
    cfg.ticket_lifetime_s = parse_duration_s(ticket_life);
    if (cfg.authorization_policy_files.empty())
      log::warn("no --authorization-policy-file: every request will be denied");

    signal(SIGPIPE, SIG_IGN);
    // The loop outlives the master: its relays free bufferevents of this base.
    EventBasePtr base = new_event_base();
    std::unique_ptr<master::Registry> registry;
    if (!etcd_servers.empty()) {
      etcd_opt.client.endpoints = etcd::parse_endpoints(etcd_servers);
      etcd_opt.compaction_interval_s = etcd_compaction == "0" ? 0 : parse_duration_s(etcd_compaction);
      etcd_opt.max_staleness_ms = parse_duration_s(etcd_staleness) * 1000;
      etcd_opt.client.request_timeout_ms = static_cast<int>(parse_duration_s(etcd_timeout) * 1000);
      etcd_opt.host = cfg.bind_address + ":" + std::to_string(cfg.secure_port);
      registry = std::make_unique<master::EtcdRegistry>(base.get(), etcd_opt, cfg.lease_duration_s * 1000);
    } else if (!etcd_opt.client.ca_file.empty() || !etcd_opt.client.cert_file.empty() ||
               !etcd_opt.client.key_file.empty()) {
      throw Error("--etcd-cafile/--etcd-certfile/--etcd-keyfile need --etcd-servers");
    }
    master::Master m(cfg, std::move(registry));
    auto ctx = proto::make_server_ctx(read_regular_file(cfg.tls_cert_file, kMaxPemFileBytes),
                                      read_regular_file(cfg.tls_private_key_file, kMaxPemFileBytes), true);
    // The full chain for clients that need intermediates.
    if (SSL_CTX_use_certificate_chain_file(ctx.get(), cfg.tls_cert_file.c_str()) != 1)
      throw Error("cannot load certificate chain " + cfg.tls_cert_file + ": " + openssl_error());
    if (!cfg.client_ca_file.empty()) {
      // Advertise the acceptable CAs: Go clients (kubectl) only send a
      // certificate that chains to one of them.
      STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(cfg.client_ca_file.c_str());
      if (!names) throw Error("cannot read client CA names from " + cfg.client_ca_file);
      SSL_CTX_set_client_CA_list(ctx.get(), names);
    }
    master::Server server(
        base.get(), ctx.get(), [&m](const master::Request& r) { return m.handle(r); }, cfg.limits);
    uint16_t port = server.listen(cfg.bind_address, cfg.secure_port);

    auto on_signal = [](evutil_socket_t, short, void* arg) { event_base_loopbreak(static_cast<event_base*>(arg)); };
    EventPtr sigterm = new_event(base.get(), SIGTERM, EV_SIGNAL | EV_PERSIST, on_signal, base.get());
    EventPtr sigint = new_event(base.get(), SIGINT, EV_SIGNAL | EV_PERSIST, on_signal, base.get());
    evsignal_add(sigterm.get(), nullptr);
    evsignal_add(sigint.get(), nullptr);
    auto on_tick = [](evutil_socket_t, short, void* arg) { static_cast<master::Master*>(arg)->expire_leases(); };
    EventPtr tick = new_event(base.get(), -1, EV_PERSIST, on_tick, &m);
    timeval every{std::max<int64_t>(1, std::min<int64_t>(cfg.lease_duration_s / 4, 10)), 0};
    evtimer_add(tick.get(), &every);

    log::info("listening", {{"address", cfg.bind_address}, {"port", port}});
    master::SystemdNotifier systemd(base.get());
    systemd.ready("listening on " + cfg.bind_address + ":" + std::to_string(port));
    event_base_dispatch(base.get());
    systemd.stopping();
    log::info("shutting down");
    return 0;
  } catch (const std::exception& e) {
    log::error(e.what());
    return 1;
  }
}
