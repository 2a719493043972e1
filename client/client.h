// shimctl: the kubectl-like client (docs/design.md "Processes", "Native
// protocol"). The binary (client/main.cc) only calls client::main.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"
#include "proto/tls.h"

namespace shimlet::client {

// Own errors and usage errors: main prints "error: " + what() and exits 255.
struct UsageError : Error {
  using Error::Error;
};

inline constexpr int kOwnErrorExit = 255;  // like ssh
inline constexpr const char* kDefaultStateDir = "/run/shimlet";

struct ExecOptions {
  std::string target;                // container id, unique id prefix, or pod name
  std::string container;             // -c: container name within the pod
  bool stdin_ = false;               // -i
  bool tty = false;                  // -t
  std::vector<std::string> command;  // everything after --
};

struct Invocation {
  bool help = false;  // -h/--help: help_text goes to stdout, exit 0
  std::string help_text;
  bool local = false;          // --local: root on the node, mint our own ticket
  std::string state_dir;       // --state-dir, else $SHIMLET_STATE_DIR, else kDefaultStateDir
  std::string ns = "default";  // -n/--namespace (pod name lookups)
  std::string verb;            // "exec"
  ExecOptions exec;
};

// Parses argv (argv[0] is the program name). Throws UsageError.
Invocation parse_args(const std::vector<std::string>& argv);
// $SHIMLET_STATE_DIR or kDefaultStateDir.
std::string default_state_dir();

// One STATE_DIR/<id>/registration.json (only the fields the client needs).
struct Registration {
  std::string id, ns, pod, container, endpoint, pin;
  bool sandbox = false;  // CRI/docker pod sandbox ("pause"): never a pod-name match
  std::string path;      // where it was read from (for messages)
};
// Parses one registration.json text; throws Error naming `path` on bad input.
Registration parse_registration(const std::string& text, const std::string& path);
// Every readable STATE_DIR/*/registration.json, sorted by id. Unparsable ones
// are skipped (a container being torn down); an unreadable STATE_DIR throws.
std::vector<Registration> load_registrations(const std::string& state_dir);

// TARGET resolution, in order: exact container id; pod name in namespace ns
// (its only container, or the one named by `container`); unique id prefix.
// `container`, when given, must match the chosen container's name.
// Ambiguity or no match throws Error listing the candidates.
const Registration& resolve_target(const std::vector<Registration>& regs, const std::string& target,
                                   const std::string& ns, const std::string& container);

// What a client needs to reach a shim: where, whom to trust, and the ticket.
struct Grant {
  std::string container_id;
  std::string endpoint;  // "host:port" / "[v6]:port"
  std::string pin;       // "sha256/<base64>"
  std::string ticket;    // compact JWS
};
// The one place that decides where endpoint+pin+ticket come from. Local mode
// reads the state dir and mints with STATE_DIR/local.key; the master mode
// (later) asks shimlet-master instead. `client` is this run's TLS identity,
// whose key the ticket binds (cnf.jkt).
Grant obtain_exec_grant(const Invocation& inv, const proto::Identity& client);
// Local implementation (exposed for tests).
Grant local_exec_grant(const std::string& state_dir, const std::string& ns, const ExecOptions& ex,
                       const proto::Identity& client, int64_t now);
// $SUDO_USER, else the name of the real uid (audit `sub`).
std::string invoking_user();

// Runs the exec stream against the shim; returns the process's exit code
// (255 for our own errors, which it has already printed).
int run_exec(const Grant& grant, const ExecOptions& ex, const proto::Identity& client);

// Whole program: parse, obtain the grant, run. Returns the exit status.
int main(int argc, char** argv);

}  // namespace shimlet::client
