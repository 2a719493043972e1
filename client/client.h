// shimctl: the kubectl-like client (docs/design.md "Processes", "Native
// protocol"). The binary (client/main.cc) only calls client::main.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "proto/tls.h"
#include "ticket/ticket.h"

namespace shimlet::masterclient {
class Masters;
}

namespace shimlet::client {

// Own errors and usage errors: main prints "error: " + what() and exits 255.
struct UsageError : Error {
  using Error::Error;
};

inline constexpr int kOwnErrorExit = 255;  // like ssh
// The shim killed the session for exceeding its pids/memory limit (STATUS
// "killed"; docs/design.md "Exec"); printed as "error: session killed: ...".
inline constexpr int kSessionKilledExit = 254;
inline constexpr const char* kDefaultStateDir = "/run/shimlet";
// --local tickets only need to outlive connect + handshake: a connection that
// accepted a ticket keeps it (docs/design.md "Port-forward").
inline constexpr int64_t kDefaultLocalTicketLifetimeS = 30;
inline constexpr int kDefaultPingIntervalS = 30;

struct ExecOptions {
  std::string target;                // container id, unique id prefix, or pod name
  ticket::Limits limits;             // --limit-*: the ticket's "limits" claim (--local; capped by the shim)
  std::string container;             // -c: container name within the pod
  bool stdin_ = false;               // -i
  bool tty = false;                  // -t
  std::vector<std::string> command;  // everything after --
};

// One forwarded port: "[LOCAL:]REMOTE[/udp|/tcp]" (kubectl's forms; LOCAL 0 or
// empty = pick a free port).
struct PortSpec {
  uint16_t local = 0;  // 0: the kernel picks a free port
  uint16_t remote = 0;
  bool udp = false;
  bool operator==(const PortSpec&) const = default;
};
// Parses one port argument; throws UsageError naming it.
PortSpec parse_port_spec(const std::string& arg);

struct PortForwardOptions {
  std::string target;                  // as for exec
  std::string container;               // -c
  std::vector<std::string> addresses;  // --address (comma lists merged); "localhost" or IP literals
  std::vector<PortSpec> ports;
  bool stdio = false;  // --stdio: forward our stdin/stdout to the one REMOTE port
  // --ping-interval: seconds between keepalive PINGs on the connection to the
  // shim; a PING unanswered for a whole interval drops it (ssh's ServerAliveInterval).
  int ping_interval_s = kDefaultPingIntervalS;
};
// Fills pf.target/ports from the positionals (TARGET then port specs) and
// checks the combination (--stdio: exactly one REMOTE, no --address); the
// default address list is {"localhost"}. Throws UsageError.
void parse_port_forward(PortForwardOptions& pf, const std::vector<std::string>& positional);

// `shimctl sessions list|play|export` (client/sessions.cc; docs/recording.md).
struct SessionsOptions {
  std::string action;       // "list" | "play" | "export"
  std::string id;           // play, export
  std::string user;         // list: --user filter
  std::string output;       // list: -o table (default) | json
  double speed = 1.0;       // play: --speed
  double idle_limit_s = 0;  // play: --idle-time-limit (0 = keep every pause)
};

// kubectl's connection flags (master mode); empty = from the kubeconfig.
// Several masters (any may be down): --server A,B (or repeated) or --context
// X,Y (or repeated); a request goes to the first that can be reached
// (masterclient::Masters).
struct MasterFlags {
  std::vector<std::string> servers;   // --server https://HOST:PORT[,...]
  std::string token;                  // --token
  std::string ca;                     // --certificate-authority PATH
  std::string client_cert;            // --client-certificate PATH
  std::string client_key;             // --client-key PATH
  std::string kubeconfig;             // --kubeconfig PATH (else $KUBECONFIG, else ~/.kube/config)
  std::vector<std::string> contexts;  // --context NAME[,...] (else current-context)
};

// How shimctl reaches the shim in master mode (docs/design.md "Proxy mode").
enum class ProxyMode {
  Auto,    // direct TCP to the shim; the master's tunnel when that fails within kDirectConnectTimeoutMs
  Always,  // --proxy: always through the master's tunnel
};
inline constexpr int kDirectConnectTimeoutMs = 2000;

struct Invocation {
  bool help = false;  // -h/--help: help_text goes to stdout, exit 0
  std::string help_text;
  bool local = false;          // --local: root on the node, mint our own ticket
  bool local_tls = false;      // --tls: --local exec over the shim's TLS port, not its local socket
  std::string state_dir;       // --state-dir, else $SHIMLET_STATE_DIR, else kDefaultStateDir
  std::string ns = "default";  // -n/--namespace (pod name lookups)
  int64_t ticket_lifetime_s = kDefaultLocalTicketLifetimeS;  // --ticket-lifetime (--local)
  bool ns_set = false;  // -n given (else the kubeconfig context's namespace applies in master mode)
  MasterFlags master;
  ProxyMode proxy = ProxyMode::Auto;
  std::string verb;              // "exec" | "port-forward" | "sessions" | "completion"
  std::string completion_shell;  // `completion SHELL`: "bash" | "zsh"
  ExecOptions exec;
  PortForwardOptions pf;
  SessionsOptions sessions;
};

// Parses argv (argv[0] is the program name). Throws UsageError.
Invocation parse_args(const std::vector<std::string>& argv);
// `shimctl completion SHELL`: the bash or zsh completion script, generated
// from the CLI11 definition (client/cli.h). Throws UsageError for another shell.
std::string completion_script(const std::string& shell);
// $SHIMLET_STATE_DIR or kDefaultStateDir.
std::string default_state_dir();

// One STATE_DIR/<id>/registration.json (only the fields shimctl and
// shimlet-cri need).
struct Registration {
  std::string id, ns, pod, container, endpoint, pin;
  std::string local_socket;  // the shim's root-only unix socket ("" from older hooks)
  // The shim's plain-HTTP loopback listener for the CRI streaming shapes
  // (docs/design.md "CRI proxy"); "" when the hook config does not enable it.
  std::string cri_endpoint;
  bool sandbox = false;    // CRI/docker pod sandbox ("pause"): never a pod-name match
  std::string sandbox_id;  // the CRI pod sandbox this container belongs to (annotations; "" = unknown)
  std::string path;        // where it was read from (for messages)
  // The shim and the container's init, each named by pid and start time
  // (/proc/PID/stat field 22; 0: not recorded, by an older hook).
  int64_t pid = 0, shim_pid = 0;
  uint64_t pid_start_time = 0, shim_start_time = 0;
  // Both still run (load_registrations checks it): a registration whose
  // container or shim is gone is stale and never offered.
  bool alive = true;
};
// Parses one registration.json text; throws Error naming `path` on bad input.
Registration parse_registration(const std::string& text, const std::string& path);
// Reads and parses one registration file (bounded) and checks its liveness;
// nullopt when it is missing, too large or unparsable (a container being
// created or torn down).
std::optional<Registration> read_registration(const std::string& path);
// Every readable STATE_DIR/*/registration.json, sorted by id, each with its
// liveness checked (shim and container init: pid + start time, never a bare
// pid). Unparsable ones are skipped (a container being torn down); an
// unreadable STATE_DIR throws.
std::vector<Registration> load_registrations(const std::string& state_dir);
// The liveness check of load_registrations, for one registration.
bool registration_alive(const Registration& r);

// TARGET resolution among the live registrations, in order: exact container
// id; pod name in namespace ns (its only container, or the one named by
// `container`); unique id prefix (as podman and docker accept). `container`,
// when given, must match the chosen container's name. Ambiguity or no match
// throws Error listing a few candidates, one per line; a stale registration
// named by its exact id says so.
const Registration& resolve_target(const std::vector<Registration>& regs, const std::string& target,
                                   const std::string& ns, const std::string& container);

// What a client needs to reach a shim: where, whom to trust, and the ticket.
struct Grant {
  std::string container_id;
  std::string endpoint;  // "host:port" / "[v6]:port"
  std::string pin;       // "sha256/<base64>"
  std::string ticket;    // compact JWS
  // Local exec: connect here (the shim's root-only unix socket; HTTP/2
  // without TLS, docs/design.md "Local socket") instead of endpoint.
  std::string local_socket;
  // Where the client connects, for messages: local_socket or endpoint.
  const std::string& address() const { return local_socket.empty() ? endpoint : local_socket; }
  // Master mode: how to ask the master for a tunnel to this shim when it
  // cannot (or, with --proxy, must not) be reached directly. Empty
  // tunnel_path = local mode: direct only.
  std::string tunnel_path;  // /apis/shimlet.io/v1/namespaces/NS/pods/POD/tunnel?container=C
  std::string master;       // the master that granted (asked first for the tunnel)
  ProxyMode proxy = ProxyMode::Auto;
  const Invocation* inv = nullptr;  // for the master's address and credentials
};
// The one place that decides where endpoint+pin+ticket come from. Local mode
// reads the state dir and mints with STATE_DIR/local.key; the master mode
// (later) asks shimlet-master instead. `client` is this run's TLS identity,
// whose key the ticket binds (cnf.jkt).
Grant obtain_exec_grant(const Invocation& inv, const proto::Identity& client);
// Local implementation (exposed for tests).
// Local tickets expire lifetime_s after now.
Grant local_exec_grant(const std::string& state_dir, const std::string& ns, const ExecOptions& ex,
                       const proto::Identity& client, int64_t now, int64_t lifetime_s = kDefaultLocalTicketLifetimeS);
// Local exec in two steps, so that shimctl can mint its TLS identity and the
// ticket while the shim answers the connection (client/exec.cc):
// local_exec_target resolves TARGET and reads (does not parse) the node key,
// so a bad target or a non-root caller fails before any connection;
// mint_local_exec_ticket parses the key and fills grant.ticket for `client`.
struct LocalExec {
  LocalExec() = default;
  LocalExec(const LocalExec&) = default;
  LocalExec& operator=(const LocalExec&) = default;
  ~LocalExec();  // wipes key_pem
  Grant grant;   // ticket empty until minted
  std::string key_path, key_pem;
  std::string sub;  // the ticket's audit user; "" = invoking_user()
};
LocalExec local_exec_target(const std::string& state_dir, const std::string& ns, const ExecOptions& ex);
// The same for an already chosen registration (shimlet-cri knows the id).
LocalExec local_exec_for(const Registration& reg, const std::string& state_dir);
void mint_local_exec_ticket(LocalExec& le, const ExecOptions& ex, const proto::Identity& client, int64_t now,
                            int64_t lifetime_s = kDefaultLocalTicketLifetimeS);
// An exec ticket's verb claims: cmd, stdin, tty, limits.
ticket::Claims exec_claims(const ExecOptions& ex);
// The node-key minter behind all of the above: signs `c` (the verb and its
// claims; iss "local", sub, aud, iat, exp, jti and sid are set here) for
// container_id with key_pem (STATE_DIR/local.key, read with read_node_key),
// bound to client's key when it has one. Throws Error naming key_path.
std::string sign_local_ticket(const std::string& container_id, const std::string& key_path, const std::string& key_pem,
                              ticket::Claims c, const proto::Identity& client, int64_t now, const std::string& sub,
                              int64_t lifetime_s = kDefaultLocalTicketLifetimeS);
std::string read_node_key(const std::string& state_dir);
// Same for `port-forward`: the ticket's verb is "portforward" and its ports
// claim lists every REMOTE (the shim refuses any other port). An empty
// `client` identity (--local without --tls) means the shim's local socket.
Grant obtain_portforward_grant(const Invocation& inv, const proto::Identity& client);
Grant local_portforward_grant(const std::string& state_dir, const std::string& ns, const PortForwardOptions& pf,
                              const proto::Identity& client, int64_t now,
                              int64_t lifetime_s = kDefaultLocalTicketLifetimeS);
// ---- master mode (client/master.cc; docs/master-api.md "Grants")

// The parts of kubeconfig files shimctl uses (clusters, users, contexts,
// current-context). Paths are already resolved against the defining file's
// directory; -data fields are decoded.
struct KubeConfig {
  struct Cluster {
    std::string server, ca_file, ca_pem;
    bool insecure = false;
  };
  struct User {
    std::string token, token_file, cert_file, cert_pem, key_file, key_pem, unsupported;
  };
  struct Context {
    std::string cluster, user, ns;
  };
  std::string current_context;
  std::map<std::string, Cluster> clusters;
  std::map<std::string, User> users;
  std::map<std::string, Context> contexts;
};
// Merges one kubeconfig text into kc, kubectl's way: the first file to set
// current-context or a named entry wins. Throws Error("PATH: ...") (fuzzed).
void merge_kubeconfig(KubeConfig& kc, std::string_view text, const std::string& path);
// --kubeconfig, else the $KUBECONFIG list, else ~/.kube/config.
std::vector<std::string> kubeconfig_paths(const std::string& flag);

// Everything needed to talk to the masters, after flags + kubeconfig.
struct MasterSettings {
  struct Master {
    std::string server, ca_pem, token, cert_pem, key_pem;
  };
  // In the order they are tried: the --server list (each with
  // --certificate-authority, else the CA of the context whose cluster has
  // that server), else each --context's (or the current context's) cluster
  // with its own CA and user. Flags beat the kubeconfig, field by field.
  std::vector<Master> masters;
  std::string ns;      // the (first) context's namespace ("" = none)
  std::string source;  // the kubeconfig files read (messages)
};
// Throws UsageError when no master or no credential is configured, Error on
// unreadable/invalid files.
MasterSettings master_settings(const Invocation& inv);
// The masterclient connection settings for s (shimctl's user agent), first
// `prefer` when it is one of them.
masterclient::Masters master_targets(const MasterSettings& s, int timeout_ms, const std::string& prefer = "");
// POST .../namespaces/NS/pods/POD/{exec,portforward} with this run's jkt; the
// master's refusal becomes Error(its Status message).
Grant master_exec_grant(const Invocation& inv, const proto::Identity& client);
Grant master_portforward_grant(const Invocation& inv, const proto::Identity& client);

// $SUDO_USER, else the name of the real uid (audit `sub`).
std::string invoking_user();

// Runs the exec stream against the shim; returns the process's exit code
// (255 for our own errors, which it has already printed).
int run_exec(const Grant& grant, const ExecOptions& ex, const proto::Identity& client);
// The same for --local: connects first, and makes this run's identity and
// ticket while the shim starts and answers the ClientHello.
int run_local_exec(const Invocation& inv);

// An exec without a terminal whose output is collected (shimlet-cri's
// ExecSync): no stdin, stdout/stderr kept up to max_output bytes each (the
// rest is read and dropped), over the shim's local socket (le.grant.
// local_socket must be set), le's ticket minted while the connection starts.
// timeout_ms > 0: when it passes the connection is closed, which makes the
// session kill every process of the exec; the same when cancel_fd (>= 0)
// becomes readable.
struct CapturedExec {
  std::string out, err;
  bool out_truncated = false, err_truncated = false;
  int exit_code = -1;  // the command's status (128+N: signal N); valid when status_received
  bool status_received = false;
  std::string status_error;  // the shim's STATUS "error" (the command could not start, or was killed for a limit)
  bool timed_out = false;
  bool cancelled = false;     // cancel_fd became readable: the connection was closed (the exec killed)
  bool request_sent = false;  // false: nothing reached the shim (connect/ticket/HTTP refusal): no command ran
  int http_status = 0;        // the shim's answer to the request (200 = the exec started)
  std::string error;          // our own failure ("" when the STATUS arrived)
};
CapturedExec run_captured_exec(LocalExec& le, const ExecOptions& ex, size_t max_output, int timeout_ms,
                               int cancel_fd = -1);

// Runs `port-forward` until interrupted (exit 0) or, with --stdio, until both
// directions are done (0). Every failure is shimctl's own (it runs no
// command): cannot listen, connect or authenticate, the connection to the
// shim lost, the --stdio tunnel failed: one line, exit kOwnErrorExit (255).
int run_port_forward(const Grant& grant, const PortForwardOptions& pf, const proto::Identity& client);

// `shimctl sessions ...` against the master; returns the exit status.
int run_sessions(const Invocation& inv);

// Whole program: parse, obtain the grant, run. Returns the exit status.
int main(int argc, char** argv);

}  // namespace shimlet::client
