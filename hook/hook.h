// shimlet-hook: OCI runtime hook that starts one shim per container at
// createRuntime and stops it at poststop (docs/design.md "Processes" and
// "State directory"). Usage:
//   shimlet-hook --config PATH [createRuntime|createContainer|prestart|poststop]
//   shimlet-hook --config PATH renew ID      (the shim runs this every
//                                            master.renew_interval_s: lease renewal)
//   shimlet-hook --config PATH cleanup ID    (the shim becomes this when its
//                                            container is gone: poststop's work)
// Without a stage argument the stage comes from the state's status
// ("creating"/"created" -> start, "stopped" -> cleanup).
// Implemented one job per file (hook/internal.h lists them).
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "oci/oci.h"

namespace shimlet::hook {

struct KeyRef {
  std::string kid;
  std::string path;  // PEM public key (Ed25519)
};

// The "master" object of the hook config: where shimlet-master is and the
// node credential (user system:node:NODE) used to register this node's
// containers (docs/master-api.md "Node API"). Exactly one credential:
// token, token_file, or client_cert + client_key.
struct MasterConfig {
  // https://HOST[:PORT]: "url" is one string or a list of them (several
  // masters: each request goes to the first that can be reached,
  // masterclient::Masters; timeout_ms is per master tried).
  std::vector<std::string> urls;
  std::string node;  // default: the host name
  std::string ca;    // PEM bundle path; "" = the system trust store
  std::string token, token_file, client_cert, client_key;
  int timeout_ms = 5000;      // per request (registration, renewal, delete)
  int renew_interval_s = 20;  // keep below the master's renewIntervalSeconds (lease/3)
};

// The "recording" object of the hook config (docs/recording.md "On the
// node"): where this node spools session recordings and the policy for
// tickets minted with the node's local key (`shimctl --local`); tickets from
// the master carry theirs ("rec" claim).
struct RecordingConfig {
  std::string dir;                        // the node's recording root; "" = STATE_DIR/recordings
  std::string local = "none";             // local tickets: "none" | "tty" | "all"
  bool fail_closed = true;                // local tickets' disk-full policy ("disk_full")
  uint64_t max_bytes = 256ull << 20;      // per recording, unless the ticket says otherwise
  uint64_t spool_max_bytes = 1ull << 30;  // the whole outbox (every container): above it, new recordings fail
};

// The hook config (deploy/hook.json documents it). Every field is optional.
struct Config {
  std::string state_dir = "/run/shimlet";
  std::string shim_binary;     // default: <dir of the hook executable>/shimlet
  std::string session_binary;  // default: <dir of the hook executable>/shimlet-session
  std::string listen = "127.0.0.1:0";
  // The shim's plain-HTTP listener for the CRI streaming URL shapes only
  // (/exec/<ticket>, /portforward/<ticket>) that shimlet-cri hands the
  // kubelet (docs/design.md "CRI proxy"). Loopback only; "" = none.
  std::string cri_listen;
  std::vector<KeyRef> trusted_keys;  // STATE_DIR/local.pub (kid "local") is always trusted too
  bool fail_container_on_error = false;
  int ready_timeout_ms = 2000;
  int64_t max_ticket_lifetime_s = 300;
  int64_t clock_leeway_s = 5;
  int drain_timeout_ms = 2000;
  int max_sessions = 256;        // authenticated TCP sessions at once (a valid ticket beyond: 503)
  int max_local_sessions = 256;  // local socket connections at once (its own limit)
  // The pre-authentication gate (docs/design.md "Pre-authentication gate"):
  // from accept to a valid ticket at most this long; unauthenticated
  // connections at most this many, this many per source address (IPv6: per
  // /64), this much memory in all; the idlest is dropped first.
  int preauth_timeout_ms = 5000;
  int preauth_max_connections = 4096;
  int preauth_max_per_source = 2048;
  int64_t preauth_max_memory = 32 << 20;
  // After a first connection the shim keeps one warm session ready, which
  // exits after this many seconds unused; 0: none (docs/design.md "Warm sessions").
  int warm_idle_s = 60;
  // Per-session isolation (docs/isolation.md "Configuration"), copied into
  // shim.json: {"cgroup":bool,"landlock":"strict"|"compat"|"off","selinux":bool,
  // "selinux_categories":"c1000.c1023","limits":{...},"max_limits":{...}}
  // with limits {"pids":N,"memory":BYTES,"cpu_weight":N}. Validated here.
  nlohmann::json isolation = nlohmann::json::object();
  std::optional<MasterConfig> master;  // no master: the node works with `shimctl --local` only
  RecordingConfig recording;
  std::string config_path;  // absolute path of this config file ("" = defaults), for the renewer
};

inline constexpr size_t kMaxConfigBytes = 64 * 1024;

// Parses the config JSON (untrusted: bounded, strict types/ranges, unknown
// keys refused so typos are not silently ignored). self_dir is where the
// default binaries live. Throws shimlet::Error with one clear line.
Config parse_config(std::string_view json, const std::string& self_dir);
Config load_config(const std::string& path, const std::string& self_dir);

// [A-Za-z0-9_.-]{1,128}, not "." or "..": safe as one path component.
bool valid_container_id(std::string_view id);

enum class Stage { Start, Cleanup };
// createRuntime/createContainer/prestart -> Start, poststop -> Cleanup.
std::optional<Stage> stage_from_name(std::string_view name);
// "creating"/"created" -> Start, "stopped" -> Cleanup.
std::optional<Stage> stage_from_status(std::string_view status);

struct Names {
  std::string ns, pod, container;
};
// Kubernetes/CRI annotations with the fallbacks of docs/design.md. hostname
// is the bundle config's: podman (annotation io.container.manager=libpod)
// passes no name annotation, so a hostname the user chose (one that is not
// a prefix of the container id, podman's default) names the container.
Names names_from(const std::string& id, const std::map<std::string, std::string>& annotations,
                 const std::string& hostname = "");

// What the hook learned while starting the shim.
struct Started {
  std::string endpoint;      // "127.0.0.1:40123"
  std::string pin;           // "sha256/..."
  std::string local_socket;  // STATE/<id>/shim.sock: `shimctl --local` without TLS (root only)
  pid_t shim_pid = 0;
  uint64_t shim_start_time = 0;  // /proc/PID/stat field 22, to recognise the shim at poststop
  std::string created;           // RFC 3339 UTC
  uint64_t pid_start_time = 0;   // of the container's init: `shimctl --local` never offers a dead container
  Names names;                   // names_from() of the state and the bundle's hostname
  std::string cri_endpoint;      // "127.0.0.1:40124": the CRI listener (cri_listen), "" without one
};
nlohmann::json registration_json(const oci::State& st, const Started& s);
// names: as in the registration (default: names_from(st.id, st.annotations)).
nlohmann::json shim_json(const Config& c, const oci::State& st, const std::string& dir,
                         const std::vector<std::pair<std::string, std::string>>& trusted /* kid, pem */,
                         const std::optional<Names>& names = std::nullopt);

// createRuntime: everything of design.md; throws on failure after undoing it
// (shim killed, directory removed).
Started start(const Config& c, const oci::State& st);
// poststop: stops the shim if it is still ours and removes STATE_DIR/<id>.
// Idempotent; bounded (SIGTERM, SIGKILL after 1 s). Cleanups of one
// container are serialized (a lock on its directory): a later one finds
// nothing left and returns quietly.
// With own_shim_only (the shim's own `cleanup ID`, exec'd in its place: same
// pid), a directory whose registration names another shim is a newer
// container's of the same id and is left alone: false.
bool cleanup(const Config& c, const std::string& id, bool own_shim_only = false);
// cleanup(), then the master's DELETE when the container was registered:
// the whole poststop, also run as `shimlet-hook cleanup ID` by the shim when
// its container is gone without a poststop (docs/design.md "Stale state"):
// own_shim_only then, and no DELETE when cleanup() left the directory alone.
void poststop(const Config& c, const std::string& id, bool own_shim_only = false);

// Master registration (docs/master-api.md "Node API"); each call is one
// bounded HTTPS request and throws shimlet::Error with one clear line.
// PUT STATE_DIR/<id>/registration.json (+ "node"); returns the Lease answer.
nlohmann::json register_container(const Config& c, const std::string& id);
// DELETE; an unknown container (404) is not an error.
void unregister_container(const Config& c, const std::string& id);
// `shimlet-hook renew ID`: re-PUTs the registration if the container is still
// ours (its registration.json exists); returns the exit code.
int renew(const Config& c, const std::string& id);

// Session end records (docs/design.md "Session end records"): posts the
// pending records of STATE_DIR/<id>/ends/ (oldest first, at most max, within
// budget_ms) to POST /apis/shimlet.io/v1/nodes/NODE/sessions/SID, adding the
// registration's namespace/pod/container. A record the master accepts (2xx)
// or refuses as malformed (400/413: it never would accept it) is deleted;
// any other failure stops the flush and keeps the rest for the next try.
// Called by renew() after the PUT and by cleanup() before the state directory
// goes. No master configured: nothing to do.
struct FlushResult {
  size_t posted = 0, dropped = 0, kept = 0;
  std::string error;  // why records were kept ("" = none kept)
};
FlushResult flush_session_ends(const Config& c, const std::string& id, size_t max, int budget_ms);

// Session recordings on the node (hook/recordings.cc, docs/recording.md).
RecordingConfig parse_recording(const nlohmann::json& v);
std::string recording_root(const Config& c);
// shim.json's "recording" object for container id.
nlohmann::json recording_shim_json(const Config& c, const std::string& id);
// Finishes the recordings of killed sessions (marked incomplete) and, with a
// master, uploads what is ready (docs/master-api.md "Recording upload"):
// oldest first, in chunks, resuming from the size the master has, each
// deleted once the master has it whole; 400/413 answers drop it (logged),
// any other failure keeps the rest for the next try. With `sweep`, also the
// recordings left by containers that are gone (their poststop ran out of
// time or the master was down). Within budget_ms.
struct RecordingFlush {
  size_t sent = 0, dropped = 0, kept = 0;
  std::string error;  // why recordings were kept
};
RecordingFlush flush_recordings(const Config& c, const std::string& id, int budget_ms, bool sweep);

// The whole hook (argv, stdin, overall deadline); returns the exit code.
int main(int argc, char** argv);

}  // namespace shimlet::hook
