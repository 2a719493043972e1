// The raw Ed25519 PEM loaders (common/ed25519.h) and the ticket key parsers
// they front: any input either yields a key whose PEM round-trips to the same
// key, or nullptr / a clean shimlet::Error. Keys come from root-owned files,
// but the master and shims read configured keys at start, so a bad file must
// never crash or hang them.
#include <openssl/evp.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/ed25519.h"
#include "common/error.h"
#include "ticket/ticket.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  if (EVP_PKEY* k = shimlet::ed25519_public_from_pem(in)) {
    EVP_PKEY* back = shimlet::ed25519_public_from_pem(shimlet::ed25519_public_pem(k));
    if (!back || EVP_PKEY_eq(k, back) != 1) abort();
    EVP_PKEY_free(back);
    EVP_PKEY_free(k);
  }
  if (EVP_PKEY* k = shimlet::ed25519_private_from_pem(in)) {
    EVP_PKEY* back = shimlet::ed25519_private_from_pem(shimlet::ed25519_private_pem(k));
    if (!back || EVP_PKEY_eq(k, back) != 1) abort();
    EVP_PKEY_free(back);
    EVP_PKEY_free(k);
  }
  try {
    shimlet::ticket::PublicKey::from_pem(in);
  } catch (const shimlet::Error&) {
  }
  try {
    shimlet::ticket::PrivateKey::from_pem(in);
  } catch (const shimlet::Error&) {
  }
  return 0;
}
