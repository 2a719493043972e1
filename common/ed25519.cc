#include "common/ed25519.h"

#include <string.h>

#include <stdexcept>
#include <string>

#include "common/base64.h"
#include "common/error.h"
#include "common/openssl.h"

namespace shimlet {
namespace {

// DER prefixes of the only shapes we accept (RFC 8410): SEQUENCE { AlgorithmIdentifier
// { 1.3.101.112 }, BIT STRING (32 bytes) } and PKCS#8 v1 with OCTET STRING { OCTET STRING (32) }.
constexpr unsigned char kSpkiPrefix[] = {0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00};
constexpr unsigned char kPkcs8Prefix[] = {0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06,
                                          0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20};

// Base64 body between BEGIN/END lines of the given label, decoded; "" if absent.
std::string pem_body(std::string_view pem, std::string_view label) {
  std::string begin = "-----BEGIN " + std::string(label) + "-----";
  std::string end = "-----END " + std::string(label) + "-----";
  size_t b = pem.find(begin);
  if (b == std::string_view::npos) return "";
  size_t e = pem.find(end, b);
  if (e == std::string_view::npos) return "";
  std::string b64;
  for (char c : pem.substr(b + begin.size(), e - b - begin.size()))
    if (c != '\n' && c != '\r' && c != ' ' && c != '\t') b64.push_back(c);
  if (b64.size() > 128) return "";  // Ed25519 keys are tiny; anything big is another shape
  auto der = base64_decode(b64);
  return der ? *der : "";
}

std::string pem_wrap(const std::string& der, const char* label) {
  std::string b64 = base64_encode(der), out = std::string("-----BEGIN ") + label + "-----\n";
  for (size_t i = 0; i < b64.size(); i += 64) out += b64.substr(i, 64) + "\n";
  return out + "-----END " + label + "-----\n";
}

}  // namespace

EVP_PKEY* ed25519_generate() {
  std::string seed = random_bytes(32);
  EVP_PKEY* k =
      EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(seed.data()), 32);
  OPENSSL_cleanse(seed.data(), seed.size());
  if (!k) throw Error("Ed25519 key from raw bytes failed: " + openssl_error());
  return k;
}

std::string ed25519_private_pem(EVP_PKEY* k) {
  unsigned char raw[32];
  size_t len = sizeof raw;
  if (EVP_PKEY_get_base_id(k) != EVP_PKEY_ED25519 || EVP_PKEY_get_raw_private_key(k, raw, &len) != 1 || len != 32)
    return "";
  std::string der(reinterpret_cast<const char*>(kPkcs8Prefix), sizeof kPkcs8Prefix);
  der.append(reinterpret_cast<const char*>(raw), 32);
  OPENSSL_cleanse(raw, sizeof raw);
  std::string pem = pem_wrap(der, "PRIVATE KEY");
  OPENSSL_cleanse(der.data(), der.size());
  return pem;
}

std::string ed25519_spki_der(EVP_PKEY* k) {
  unsigned char raw[32];
  size_t len = sizeof raw;
  if (!k || EVP_PKEY_get_base_id(k) != EVP_PKEY_ED25519 || EVP_PKEY_get_raw_public_key(k, raw, &len) != 1 || len != 32)
    return "";
  std::string der(reinterpret_cast<const char*>(kSpkiPrefix), sizeof kSpkiPrefix);
  der.append(reinterpret_cast<const char*>(raw), 32);
  return der;
}

std::string ed25519_public_pem(EVP_PKEY* k) {
  std::string der = ed25519_spki_der(k);
  return der.empty() ? "" : pem_wrap(der, "PUBLIC KEY");
}

EVP_PKEY* ed25519_public_from_pem(std::string_view pem) {
  std::string der = pem_body(pem, "PUBLIC KEY");
  if (der.size() != sizeof kSpkiPrefix + 32 || memcmp(der.data(), kSpkiPrefix, sizeof kSpkiPrefix) != 0) return nullptr;
  return EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr,
                                     reinterpret_cast<const unsigned char*>(der.data()) + sizeof kSpkiPrefix, 32);
}

EVP_PKEY* ed25519_private_from_pem(std::string_view pem) {
  std::string der = pem_body(pem, "PRIVATE KEY");
  EVP_PKEY* k = nullptr;
  if (der.size() == sizeof kPkcs8Prefix + 32 && memcmp(der.data(), kPkcs8Prefix, sizeof kPkcs8Prefix) == 0)
    k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr,
                                     reinterpret_cast<const unsigned char*>(der.data()) + sizeof kPkcs8Prefix, 32);
  OPENSSL_cleanse(der.data(), der.size());
  return k;
}

}  // namespace shimlet
