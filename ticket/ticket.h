// Tickets: compact JWS (RFC 7515) signed with Ed25519 ("alg":"EdDSA", RFC 8037).
// A shim serves no request without one. See docs/design.md "Tickets".
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::ticket {

struct Port {
  uint16_t port = 0;
  std::string proto = "tcp";  // "tcp" | "udp"
  bool operator==(const Port&) const = default;
};

// Per-session resource limits a ticket asks for ("limits" claim); 0 = not
// asked (the shim's default applies). The shim caps each at its config's max.
struct Limits {
  uint64_t pids = 0;        // 1..4194304
  uint64_t memory = 0;      // bytes, 1 MiB..1 PiB
  uint64_t cpu_weight = 0;  // 1..10000 (cgroup v2 cpu.weight)
  bool operator==(const Limits&) const = default;
};

// Session recording ("rec" claim, docs/recording.md): present = the shim
// records this exec; absent = it does not (a ticket without it is served
// exactly as before the claim existed).
struct Recording {
  bool fail_closed = true;  // "disk_full": "fail-closed" (end the session) | "fail-open" (go on unrecorded)
  uint64_t max_bytes = 0;   // the recording's size limit; 0 = the node's default
  bool operator==(const Recording&) const = default;
};

struct Claims {
  std::string iss, sub, aud, jti, verb, sid, node;
  int64_t iat = 0, exp = 0;
  std::vector<std::string> cmd;
  bool stdin_ = false, tty = false;
  std::vector<Port> ports;
  std::string cnf_jkt;           // base64url SHA-256 of the client key's SPKI DER; empty = unbound
  Limits limits;                 // exec only
  std::optional<Recording> rec;  // exec only
  // Not a claim: verify() sets it to the kid of the trusted key that
  // verified the signature ("local" for STATE_DIR/local.pub).
  std::string verified_kid;
};

// Ed25519 keys (OpenSSL EVP_PKEY underneath).
class PrivateKey {
 public:
  static PrivateKey generate();
  static PrivateKey from_pem(std::string_view pem);
  static PrivateKey load(const std::string& path);  // PEM file
  // load() in two steps: read the file (bounded; errors name the path), then
  // parse with from_pem. For callers that must fail early on an unreadable
  // key but parse it later (shimctl overlaps that with the TLS handshake).
  static std::string read_pem(const std::string& path);
  std::string to_pem() const;
  std::string public_pem() const;
  // Writes PEM with mode 0600 (atomically: temp file + rename).
  void save(const std::string& path) const;
  // Signs claims; a fresh header with this kid.
  std::string sign(const Claims& c, const std::string& kid) const;
  // Raw Ed25519 signature (64 bytes) of data: for signing other things than
  // Claims (and for tests that need deliberately malformed tickets).
  std::string sign_data(std::string_view data) const;
  struct Impl;
  std::shared_ptr<Impl> impl;
};

class PublicKey {
 public:
  static PublicKey from_pem(std::string_view pem);
  bool verify(std::string_view data, std::string_view sig) const;
  // A throwaway verification: the signature fetch a first verify() would
  // pay (a warm session, before its connection). Never throws.
  void warm_up() const noexcept;
  struct Impl;
  std::shared_ptr<Impl> impl;
};

struct TrustedKey {
  std::string kid;
  PublicKey key;
};

// What the shim expects of a ticket for this request.
struct Expect {
  std::string aud;       // container id
  std::string verb;      // "exec" | "portforward"
  int64_t now = 0;       // unix seconds
  int64_t leeway_s = 5;  // clock skew tolerance
  int64_t max_lifetime_s = 300;
};

// Verifies signature (against the trusted key named by kid, or each if no kid),
// then the claims' types, aud, verb, iat/exp window. Does not check jti replay
// (the shim's cache), cmd/ports (request-specific) or cnf (TLS-specific).
// Throws shimlet::Error with one clear line on any failure ("ticket expired",
// "ticket signature invalid", "ticket is for container X", ...).
Claims verify(std::string_view token, const std::vector<TrustedKey>& keys, const Expect& expect);

// Hard upper bound on an encoded ticket (bytes); longer is refused unparsed.
inline constexpr size_t kMaxTicketSize = 64 * 1024;

// base64url(SHA-256(SPKI DER)) of a PEM or X509 public key, for cnf.jkt / pins.
std::string jkt_of_public_pem(std::string_view pem);

}  // namespace shimlet::ticket
