// Fast loading of Ed25519 keys from PEM. Written by hand because OpenSSL 3's
// generic decoder framework spends ~5 million instructions per key (measured
// with callgrind) and the session process, started per connection, loads
// three keys. Ed25519 PEM is a fixed DER shape, so we check that shape and
// build the key from its 32 raw bytes; anything else returns nullptr and the
// caller falls back to OpenSSL's PEM readers.
#pragma once
#include <openssl/evp.h>

#include <string>
#include <string_view>

namespace shimlet {

// "-----BEGIN PUBLIC KEY-----" (SubjectPublicKeyInfo) -> new EVP_PKEY, or nullptr.
EVP_PKEY* ed25519_public_from_pem(std::string_view pem);
// "-----BEGIN PRIVATE KEY-----" (PKCS#8 v1, no attributes) -> new EVP_PKEY, or nullptr.
EVP_PKEY* ed25519_private_from_pem(std::string_view pem);

// A fresh key from 32 random bytes (the raw constructor avoids the provider
// key-generation machinery, ~10x cheaper). Never nullptr; throws on failure.
EVP_PKEY* ed25519_generate();
// PEM text of an Ed25519 key in the same fixed shapes (empty if not Ed25519).
std::string ed25519_private_pem(EVP_PKEY* k);
std::string ed25519_public_pem(EVP_PKEY* k);
// SubjectPublicKeyInfo DER of an Ed25519 key (empty if not Ed25519): built
// from the raw bytes, because OpenSSL 3.0 runs its encoder framework for it.
std::string ed25519_spki_der(EVP_PKEY* k);

}  // namespace shimlet
