#include "ticket/ticket.h"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common/base64.h"
#include "common/ed25519.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/file.h"
#include "common/openssl.h"

namespace shimlet::ticket {
namespace {

using json = nlohmann::json;

constexpr std::string_view kAlg = "EdDSA";
constexpr std::string_view kTyp = "shimlet-ticket+jwt";
constexpr size_t kSigLen = 64;                  // Ed25519 signature
constexpr size_t kSigB64Len = 86;               // base64url of 64 bytes, unpadded
constexpr size_t kMaxHeaderB64 = 1024;          // ours is ~80 bytes; the header is parsed before the signature check
constexpr size_t kMaxJsonDepth = 4;             // claims nest at most ports[{...}] / cnf{...}
constexpr int64_t kMaxTime = int64_t{1} << 40;  // keeps exp-iat, now+leeway free of overflow
constexpr size_t kMaxPemSize = 64 * 1024;

// Untrusted text in an error line: printable ASCII only, bounded.
std::string printable(std::string_view s, size_t max = 64) {
  std::string out;
  for (unsigned char c : s.substr(0, max)) out.push_back(c >= 0x20 && c < 0x7f ? static_cast<char>(c) : '?');
  if (s.size() > max) out += "...";
  return out;
}

BioPtr mem_bio(std::string_view s) {
  if (s.size() > kMaxPemSize) throw Error("key PEM too large (" + std::to_string(s.size()) + " bytes)");
  BioPtr b(BIO_new_mem_buf(s.data(), static_cast<int>(s.size())));
  if (!b) throw Error("BIO_new_mem_buf: " + openssl_error());
  return b;
}

std::string bio_string(BIO* b) {
  char* data = nullptr;
  long n = BIO_get_mem_data(b, &data);
  return std::string(data, static_cast<size_t>(n));
}

void require_ed25519(EVP_PKEY* k, const char* what) {
  if (EVP_PKEY_get_base_id(k) != EVP_PKEY_ED25519)
    throw Error(std::string(what) + " is not an Ed25519 key (type " + std::to_string(EVP_PKEY_get_base_id(k)) + ")");
}

// A PUBLIC KEY PEM, or else the key of a CERTIFICATE PEM.
PkeyPtr public_from_pem(std::string_view pem) {
  if (EVP_PKEY* fast = ed25519_public_from_pem(pem)) return PkeyPtr(fast);
  {
    BioPtr b = mem_bio(pem);
    PkeyPtr k(PEM_read_bio_PUBKEY(b.get(), nullptr, nullptr, nullptr));
    if (k) return k;
  }
  ERR_clear_error();
  BioPtr b = mem_bio(pem);
  X509Ptr c(PEM_read_bio_X509(b.get(), nullptr, nullptr, nullptr));
  if (!c) throw Error("cannot parse public key PEM (neither PUBLIC KEY nor CERTIFICATE): " + openssl_error());
  PkeyPtr k(X509_get_pubkey(c.get()));
  if (!k) throw Error("cannot get the certificate's public key: " + openssl_error());
  return k;
}

std::string spki_der(EVP_PKEY* k) {
  unsigned char* der = nullptr;
  int n = i2d_PUBKEY(k, &der);
  if (n <= 0) throw Error("cannot encode public key: " + openssl_error());
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(n));
  OPENSSL_free(der);
  return out;
}

// Strict base64url: only the url alphabet, no padding, and canonical (the
// unused low bits of the last char are zero), so one token has one spelling.
std::string b64url_strict(std::string_view seg, const char* what) {
  for (char c : seg) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
    if (!ok) throw Error(std::string("ticket ") + what + " is not base64url");
  }
  auto dec = base64url_decode(seg);
  if (!dec || base64url_encode(*dec) != seg) throw Error(std::string("ticket ") + what + " is not base64url");
  return std::move(*dec);
}

// Parses one JSON object, refusing duplicate keys (parsers disagree on which
// one wins, and a signed token must mean one thing) and deep nesting.
json parse_object(std::string_view text, const char* what) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (depth > static_cast<int>(kMaxJsonDepth)) throw Error(std::string("ticket ") + what + " nests too deeply");
    switch (ev) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second)
          throw Error(std::string("ticket ") + what + " has duplicate key \"" + printable(parsed.get<std::string>()) +
                      "\"");
        break;
      default:
        break;
    }
    return true;
  };
  json j = json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw Error(std::string("ticket ") + what + " is not valid JSON");
  if (!j.is_object()) throw Error(std::string("ticket ") + what + " is not a JSON object");
  return j;
}

// Typed claim accessors: absent → nullopt/default, present with the wrong type → error.
const json* find(const json& o, const char* name) {
  auto it = o.find(name);
  return it == o.end() ? nullptr : &*it;
}

std::string get_string(const json& o, const char* name, bool required) {
  const json* v = find(o, name);
  if (!v) {
    if (required) throw Error(std::string("ticket has no \"") + name + "\" claim");
    return {};
  }
  if (!v->is_string()) throw Error(std::string("ticket claim \"") + name + "\" is not a string");
  return v->get<std::string>();
}

bool get_bool(const json& o, const char* name) {
  const json* v = find(o, name);
  if (!v) return false;
  if (!v->is_boolean()) throw Error(std::string("ticket claim \"") + name + "\" is not a boolean");
  return v->get<bool>();
}

int64_t get_time(const json& o, const char* name) {
  const json* v = find(o, name);
  if (!v) throw Error(std::string("ticket has no \"") + name + "\" claim");
  // Integers only: NumericDate fractions have no use here.
  if (!v->is_number_integer()) throw Error(std::string("ticket claim \"") + name + "\" is not an integer");
  bool in_range = v->is_number_unsigned() ? v->get<uint64_t>() <= static_cast<uint64_t>(kMaxTime)
                                          : v->get<int64_t>() >= 0 && v->get<int64_t>() <= kMaxTime;
  if (!in_range) throw Error(std::string("ticket claim \"") + name + "\" is out of range");
  return v->get<int64_t>();
}

std::vector<std::string> get_cmd(const json& o) {
  std::vector<std::string> out;
  const json* v = find(o, "cmd");
  if (!v) return out;
  if (!v->is_array()) throw Error("ticket claim \"cmd\" is not an array");
  for (const json& a : *v) {
    if (!a.is_string()) throw Error("ticket claim \"cmd\" has a non-string element");
    out.push_back(a.get<std::string>());
  }
  return out;
}

std::vector<Port> get_ports(const json& o) {
  std::vector<Port> out;
  const json* v = find(o, "ports");
  if (!v) return out;
  if (!v->is_array()) throw Error("ticket claim \"ports\" is not an array");
  for (const json& p : *v) {
    if (!p.is_object()) throw Error("ticket claim \"ports\" has a non-object element");
    const json* port = find(p, "port");
    if (!port || !port->is_number_integer()) throw Error("ticket port has no integer \"port\"");
    // Port 0 = any TCP port (minted only by the master for kubectl, whose
    // pods/portforward is not port-scoped; docs/design.md "Kubernetes streaming").
    bool ok = port->is_number_unsigned() ? port->get<uint64_t>() <= 65535
                                         : port->get<int64_t>() >= 0 && port->get<int64_t>() <= 65535;
    if (!ok) throw Error("ticket port " + port->dump() + " is out of range 0..65535");
    const json* proto = find(p, "proto");
    if (!proto || !proto->is_string()) throw Error("ticket port has no string \"proto\"");
    std::string pr = proto->get<std::string>();
    if (pr != "tcp" && pr != "udp") throw Error("ticket port proto \"" + printable(pr) + "\" is not tcp or udp");
    if (port->get<int64_t>() == 0 && pr != "tcp") throw Error("ticket port 0 (any) is only for tcp");
    out.push_back(Port{static_cast<uint16_t>(port->get<int64_t>()), pr});
  }
  return out;
}

std::string get_cnf_jkt(const json& o) {
  const json* v = find(o, "cnf");
  if (!v) return {};
  if (!v->is_object()) throw Error("ticket claim \"cnf\" is not an object");
  std::string jkt = get_string(*v, "jkt", true);
  // base64url of a SHA-256: 43 chars, 32 bytes.
  bool ok = jkt.size() == 43;
  if (ok) {
    try {
      ok = b64url_strict(jkt, "cnf.jkt").size() == 32;
    } catch (const Error&) {
      ok = false;
    }
  }
  if (!ok) throw Error("ticket claim \"cnf.jkt\" is not a base64url SHA-256");
  return jkt;
}

Limits get_limits(const json& o) {
  Limits l;
  const json* v = find(o, "limits");
  if (!v) return l;
  if (!v->is_object()) throw Error("ticket claim \"limits\" is not an object");
  for (auto& [k, x] : v->items()) {
    uint64_t lo = 1, hi = 0;
    uint64_t* dst = nullptr;
    if (k == "pids") {
      dst = &l.pids, hi = 4194304;
    } else if (k == "memory") {
      dst = &l.memory, lo = 1u << 20, hi = 1ull << 50;
    } else if (k == "cpu_weight") {
      dst = &l.cpu_weight, hi = 10000;
    } else {
      throw Error("ticket claim \"limits\" has an unknown key \"" + printable(k) + "\"");
    }
    if (!x.is_number_unsigned() || x.get<uint64_t>() < lo || x.get<uint64_t>() > hi)
      throw Error("ticket limit \"" + k + "\" must be an integer in " + std::to_string(lo) + ".." + std::to_string(hi));
    *dst = x.get<uint64_t>();
  }
  return l;
}

std::optional<Recording> get_rec(const json& o) {
  const json* v = find(o, "rec");
  if (!v) return std::nullopt;
  if (!v->is_object()) throw Error("ticket claim \"rec\" is not an object");
  Recording r;
  for (auto& [k, x] : v->items()) {
    if (k == "disk_full") {
      if (!x.is_string() || (x != "fail-closed" && x != "fail-open"))
        throw Error("ticket claim \"rec.disk_full\" must be \"fail-closed\" or \"fail-open\"");
      r.fail_closed = x == "fail-closed";
    } else if (k == "max_bytes") {
      // 64 KiB .. 1 TiB: below the encoder's minimum a recording holds nothing.
      if (!x.is_number_unsigned() || x.get<uint64_t>() < (64u << 10) || x.get<uint64_t>() > (1ull << 40))
        throw Error("ticket claim \"rec.max_bytes\" must be an integer in 65536..1099511627776");
      r.max_bytes = x.get<uint64_t>();
    } else {
      throw Error("ticket claim \"rec\" has an unknown key \"" + printable(k) + "\"");
    }
  }
  return r;
}

Claims claims_from_json(const json& o) {
  Claims c;
  c.iss = get_string(o, "iss", false);
  c.sub = get_string(o, "sub", false);
  c.aud = get_string(o, "aud", true);
  c.jti = get_string(o, "jti", true);
  c.verb = get_string(o, "verb", true);
  c.sid = get_string(o, "sid", false);
  c.node = get_string(o, "node", false);
  c.iat = get_time(o, "iat");
  c.exp = get_time(o, "exp");
  c.cmd = get_cmd(o);
  c.stdin_ = get_bool(o, "stdin");
  c.tty = get_bool(o, "tty");
  c.ports = get_ports(o);
  c.cnf_jkt = get_cnf_jkt(o);
  c.limits = get_limits(o);
  c.rec = get_rec(o);
  if (c.jti.empty()) throw Error("ticket claim \"jti\" is empty");
  return c;
}

json claims_to_json(const Claims& c) {
  json o = json::object();
  o["iss"] = c.iss;
  o["sub"] = c.sub;
  o["aud"] = c.aud;
  o["iat"] = c.iat;
  o["exp"] = c.exp;
  o["jti"] = c.jti;
  o["verb"] = c.verb;
  if (!c.cmd.empty()) o["cmd"] = c.cmd;
  if (c.stdin_) o["stdin"] = true;
  if (c.tty) o["tty"] = true;
  if (!c.ports.empty()) {
    json ports = json::array();
    for (const Port& p : c.ports) ports.push_back({{"port", p.port}, {"proto", p.proto}});
    o["ports"] = std::move(ports);
  }
  if (!c.cnf_jkt.empty()) o["cnf"] = {{"jkt", c.cnf_jkt}};
  if (c.limits != Limits{}) {
    json l = json::object();
    if (c.limits.pids) l["pids"] = c.limits.pids;
    if (c.limits.memory) l["memory"] = c.limits.memory;
    if (c.limits.cpu_weight) l["cpu_weight"] = c.limits.cpu_weight;
    o["limits"] = std::move(l);
  }
  if (c.rec) {
    json r = {{"disk_full", c.rec->fail_closed ? "fail-closed" : "fail-open"}};
    if (c.rec->max_bytes) r["max_bytes"] = c.rec->max_bytes;
    o["rec"] = std::move(r);
  }
  if (!c.sid.empty()) o["sid"] = c.sid;
  if (!c.node.empty()) o["node"] = c.node;
  return o;
}

// A key file: small, regular.
std::string read_small_file(const std::string& path) { return read_regular_file(path, kMaxPemSize); }

}  // namespace

struct PrivateKey::Impl {
  PkeyPtr key;
};
struct PublicKey::Impl {
  PkeyPtr key;
};

PrivateKey PrivateKey::generate() {
  PkeyPtr k(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  if (!k) throw Error("Ed25519 keygen: " + openssl_error());
  PrivateKey out;
  out.impl = std::make_shared<Impl>(Impl{std::move(k)});
  return out;
}

PrivateKey PrivateKey::from_pem(std::string_view pem) {
  PkeyPtr k(ed25519_private_from_pem(pem));
  if (!k) {
    BioPtr b = mem_bio(pem);
    k.reset(PEM_read_bio_PrivateKey(b.get(), nullptr, nullptr, nullptr));
  }
  if (!k) throw Error("cannot parse private key PEM: " + openssl_error());
  require_ed25519(k.get(), "private key");
  PrivateKey out;
  out.impl = std::make_shared<Impl>(Impl{std::move(k)});
  return out;
}

std::string PrivateKey::read_pem(const std::string& path) { return read_small_file(path); }

PrivateKey PrivateKey::load(const std::string& path) {
  std::string pem = read_small_file(path);
  try {
    return from_pem(pem);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
}

std::string PrivateKey::to_pem() const {
  BioPtr b(BIO_new(BIO_s_mem()));
  if (!b || PEM_write_bio_PrivateKey(b.get(), impl->key.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
    throw Error("PEM encode private key: " + openssl_error());
  return bio_string(b.get());
}

std::string PrivateKey::public_pem() const {
  BioPtr b(BIO_new(BIO_s_mem()));
  if (!b || PEM_write_bio_PUBKEY(b.get(), impl->key.get()) != 1)
    throw Error("PEM encode public key: " + openssl_error());
  return bio_string(b.get());
}

void PrivateKey::save(const std::string& path) const {
  // The temp file is created 0600: the key is never readable by others.
  write_file_atomic(path, to_pem(), 0600);
}

std::string PrivateKey::sign_data(std::string_view data) const {
  MdCtxPtr ctx(EVP_MD_CTX_new());
  std::string sig(kSigLen, '\0');
  size_t len = sig.size();
  if (!ctx || EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, impl->key.get()) != 1 ||
      EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len,
                     reinterpret_cast<const unsigned char*>(data.data()), data.size()) != 1)
    throw Error("Ed25519 sign: " + openssl_error());
  sig.resize(len);
  return sig;
}

std::string PrivateKey::sign(const Claims& c, const std::string& kid) const {
  json h = {{"alg", kAlg}, {"typ", kTyp}};
  if (!kid.empty()) h["kid"] = kid;
  std::string input = base64url_encode(h.dump()) + "." + base64url_encode(claims_to_json(c).dump());
  return input + "." + base64url_encode(sign_data(input));
}

PublicKey PublicKey::from_pem(std::string_view pem) {
  PkeyPtr k = public_from_pem(pem);
  require_ed25519(k.get(), "public key");
  PublicKey out;
  out.impl = std::make_shared<Impl>(Impl{std::move(k)});
  return out;
}

bool PublicKey::verify(std::string_view data, std::string_view sig) const {
  if (!impl || sig.size() != kSigLen) return false;
  MdCtxPtr ctx(EVP_MD_CTX_new());
  bool ok = ctx && EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, impl->key.get()) == 1 &&
            EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                             reinterpret_cast<const unsigned char*>(data.data()), data.size()) == 1;
  ERR_clear_error();
  return ok;
}

void PublicKey::warm_up() const noexcept {
  static const char zeros[kSigLen] = {};
  (void)verify(std::string_view(zeros, sizeof zeros), std::string_view(zeros, sizeof zeros));
}

Claims verify(std::string_view token, const std::vector<TrustedKey>& keys, const Expect& expect) {
  if (token.size() > kMaxTicketSize)
    throw Error("ticket too large (" + std::to_string(token.size()) + " bytes, max " + std::to_string(kMaxTicketSize) +
                ")");
  size_t d1 = token.find('.');
  size_t d2 = d1 == std::string_view::npos ? d1 : token.find('.', d1 + 1);
  if (d2 == std::string_view::npos || token.find('.', d2 + 1) != std::string_view::npos)
    throw Error("ticket is not a compact JWS (need exactly 3 dot-separated parts)");
  std::string_view h64 = token.substr(0, d1), p64 = token.substr(d1 + 1, d2 - d1 - 1), s64 = token.substr(d2 + 1);

  // Header first: it names the algorithm and key. Refuse everything but EdDSA
  // so "none"/HMAC-with-the-public-key confusions cannot arise.
  if (h64.size() > kMaxHeaderB64) throw Error("ticket header too large");
  json h = parse_object(b64url_strict(h64, "header"), "header");
  const json* alg = find(h, "alg");
  if (!alg || !alg->is_string()) throw Error("ticket header has no \"alg\"");
  if (alg->get<std::string>() != kAlg)
    throw Error("ticket alg \"" + printable(alg->get<std::string>()) + "\" is not allowed (only EdDSA)");
  const json* typ = find(h, "typ");
  if (!typ || !typ->is_string() || typ->get<std::string>() != kTyp)
    throw Error("ticket typ is not \"" + std::string(kTyp) + "\"");
  if (find(h, "crit")) throw Error("ticket header has \"crit\" extensions, none are supported");
  const json* kid = find(h, "kid");
  if (kid && !kid->is_string()) throw Error("ticket kid is not a string");

  if (s64.size() != kSigB64Len) throw Error("ticket signature invalid (wrong length)");
  std::string sig = b64url_strict(s64, "signature");
  std::string_view signing_input = token.substr(0, d2);
  if (keys.empty()) throw Error("no trusted ticket keys configured");
  bool ok = false;
  std::string verified_kid;
  if (kid) {
    std::string want = kid->get<std::string>();
    const TrustedKey* k = nullptr;
    for (const TrustedKey& t : keys)
      if (t.kid == want) k = &t;
    if (!k) throw Error("ticket kid \"" + printable(want) + "\" is not trusted");
    ok = k->key.verify(signing_input, sig);
    verified_kid = k->kid;
  } else {
    for (const TrustedKey& t : keys)
      if ((ok = t.key.verify(signing_input, sig))) {
        verified_kid = t.kid;
        break;
      }
  }
  if (!ok) throw Error("ticket signature invalid");

  // Signed: now the claims.
  Claims c = claims_from_json(parse_object(b64url_strict(p64, "payload"), "payload"));
  c.verified_kid = std::move(verified_kid);
  // 128-bit so that no Expect value can overflow the window arithmetic.
  __int128 now = expect.now, leeway = std::max<int64_t>(expect.leeway_s, 0);
  if (c.exp <= c.iat)
    throw Error("ticket exp (" + std::to_string(c.exp) + ") is not after iat (" + std::to_string(c.iat) + ")");
  if (c.exp - c.iat > expect.max_lifetime_s)
    throw Error("ticket lifetime " + std::to_string(c.exp - c.iat) + "s exceeds the maximum " +
                std::to_string(expect.max_lifetime_s) + "s");
  if (now > c.exp + leeway)
    throw Error("ticket expired " + std::to_string(static_cast<int64_t>(now - c.exp)) + "s ago");
  if (c.iat > now + leeway)
    throw Error("ticket not valid yet (issued " + std::to_string(static_cast<int64_t>(c.iat - now)) +
                "s in the future)");
  if (c.aud != expect.aud)
    throw Error("ticket is for container " + printable(c.aud) + ", not " + printable(expect.aud));
  if (c.verb != expect.verb) throw Error("ticket is for " + printable(c.verb) + ", not " + printable(expect.verb));
  return c;
}

std::string jkt_of_public_pem(std::string_view pem) {
  return base64url_encode(sha256(spki_der(public_from_pem(pem).get())));
}

}  // namespace shimlet::ticket
