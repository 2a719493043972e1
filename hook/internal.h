// What the files of hook/ share and nobody else needs (hook/hook.h is the
// folder's API). One file per job:
//   config.cc        the hook config (parse, validate)
//   keys.cc          key files: STATE_DIR/local.key + local.pub, trusted keys
//   state.cc         the state directory and its files (shim.json, registration.json)
//   shim_process.cc  the shim's start (double fork, ready line), its stop, cleanup (one at a time)
//   master_sync.cc   the master: register, unregister (poststop), renew, session end records
//   recordings.cc    session recordings: the config, the container's spool, their sending
//   cli.cc           argv, the OCI state on stdin, the overall deadline, the stage (or renew/cleanup ID)
#pragma once
#include <signal.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "hook/hook.h"

namespace shimlet::masterclient {
class Masters;
}

namespace shimlet::hook {

inline constexpr size_t kMaxStateBytes = 1 << 20;  // the OCI state on stdin
inline constexpr size_t kMaxPemBytes = 64 * 1024;
inline constexpr size_t kMaxRegistrationBytes = 256 * 1024;
inline constexpr int kStdinTimeoutMs = 5000;
inline constexpr size_t kEndsPerRenewal = 200;      // session end records posted per renewal (the rest: next tick)
inline constexpr int kPoststopFlushMs = 2000;       // poststop's final flush: the runtime is waiting
inline constexpr int kPoststopRecordingsMs = 5000;  // and its recordings' (what is left stays on the node)

// For the SIGALRM deadline handler (cli.cc; async-signal-safe state only): a
// shim being started is killed when the deadline strikes.
extern volatile sig_atomic_t g_shim_pidfd;
extern volatile sig_atomic_t g_fail_exit;
extern int64_t g_start_ms;  // when main() started (the renewer's deadline is counted from it)

// state.cc
std::string dirname_of(const std::string& p);
// Now as RFC 3339 UTC ("2026-11-27T03:04:05Z").
std::string now_rfc3339();
// Creates a private file that must not exist yet (fresh container directory).
void write_new_file(const std::string& path, std::string_view content, mode_t mode);
// Creates STATE_DIR (0700) if missing; refuses one that is not a private directory of ours.
void ensure_state_dir(const std::string& dir);

// master_sync.cc
// The masters (tried in order on a connection failure) and this node's
// credential (files read now).
masterclient::Masters masters(const MasterConfig& m);

// keys.cc
// STATE_DIR/local.key (created once) and local.pub; returns the public key PEM.
std::string ensure_local_key(const std::string& dir);
// A trusted key file: its Ed25519 public key as PEM.
std::string load_public_key(const std::string& path);

}  // namespace shimlet::hook
