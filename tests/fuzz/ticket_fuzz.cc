// Fuzzes ticket::verify(). The first input byte picks the mode:
//   byte & 3 == 0: the rest is a whole token (header, base64url, segments,
//                  signature check: what an attacker without the key controls);
//   1: the rest is a payload, signed here with the trusted key (so the fuzzer
//      gets past the signature into the claims parser and checks);
//   2: the rest is "HEADER\nPAYLOAD", both signed here;
//   3: like 1 but the header has no kid (every trusted key is tried).
//   byte & 4: expect verb "portforward" instead of "exec".
// Accepted tickets must survive sign(verify(t)) unchanged (round-trip check).
// The key is fixed (seed below) so corpus tokens keep valid signatures.
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/base64.h"
#include "common/error.h"
#include "ticket/ticket.h"

using namespace shimlet;
using namespace shimlet::ticket;

namespace {

constexpr int64_t kNow = 1'800'000'000;

PrivateKey fixed_key(unsigned char fill) {
  unsigned char seed[32];
  for (unsigned i = 0; i < sizeof seed; i++) seed[i] = static_cast<unsigned char>(fill + i);
  EVP_PKEY* k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed, sizeof seed);
  BIO* b = BIO_new(BIO_s_mem());
  if (!k || !b || PEM_write_bio_PrivateKey(b, k, nullptr, nullptr, 0, nullptr, nullptr) != 1) abort();
  char* data = nullptr;
  long n = BIO_get_mem_data(b, &data);
  PrivateKey out = PrivateKey::from_pem(std::string(data, static_cast<size_t>(n)));
  BIO_free(b);
  EVP_PKEY_free(k);
  return out;
}

struct State {
  PrivateKey key = fixed_key(1);
  PrivateKey other = fixed_key(101);
  std::vector<TrustedKey> trusted{{"k2", PublicKey::from_pem(other.public_pem())},
                                  {"k1", PublicKey::from_pem(key.public_pem())}};
};

State& state() {
  static State s;
  return s;
}

std::string signed_token(const PrivateKey& key, std::string_view header, std::string_view payload) {
  std::string input = base64url_encode(header) + "." + base64url_encode(payload);
  return input + "." + base64url_encode(key.sign_data(input));
}

bool same(const Claims& a, const Claims& b) {
  return a.iss == b.iss && a.sub == b.sub && a.aud == b.aud && a.jti == b.jti && a.verb == b.verb && a.sid == b.sid &&
         a.node == b.node && a.iat == b.iat && a.exp == b.exp && a.cmd == b.cmd && a.stdin_ == b.stdin_ &&
         a.tty == b.tty && a.ports == b.ports && a.cnf_jkt == b.cnf_jkt && a.limits == b.limits;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  State& st = state();
  unsigned mode = data[0] & 3;
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  Expect e;
  e.aud = "abc";
  e.verb = (data[0] & 4) ? "portforward" : "exec";
  e.now = kNow;

  std::string token;
  switch (mode) {
    case 0:
      token = std::string(rest);
      break;
    case 1:
      token = signed_token(st.key, R"({"alg":"EdDSA","typ":"shimlet-ticket+jwt","kid":"k1"})", rest);
      break;
    case 2: {
      size_t nl = rest.find('\n');
      std::string_view h = rest.substr(0, nl), p = nl == rest.npos ? std::string_view() : rest.substr(nl + 1);
      token = signed_token(st.key, h, p);
      break;
    }
    default:
      token = signed_token(st.key, R"({"alg":"EdDSA","typ":"shimlet-ticket+jwt"})", rest);
      break;
  }

  Claims c;
  try {
    c = verify(token, st.trusted, e);
  } catch (const Error&) {
    return 0;  // refused with a message: the expected outcome for junk
  }
  // Accepted: the claims must be within the checked bounds and re-encode to
  // a ticket that verifies to the same claims.
  if (c.aud != e.aud || c.verb != e.verb || c.jti.empty() || c.exp <= c.iat || c.exp - c.iat > e.max_lifetime_s)
    abort();
  for (const Port& p : c.ports)
    if (p.port == 0 || (p.proto != "tcp" && p.proto != "udp")) abort();
  std::string again = st.key.sign(c, "k1");
  if (again.size() <= kMaxTicketSize) {
    Claims c2 = verify(again, st.trusted, e);  // throwing here is a bug: let it crash
    if (!same(c, c2)) abort();
  }
  return 0;
}
