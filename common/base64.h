// base64 / base64url via OpenSSL's EVP encoder (url alphabet mapped here:
// OpenSSL 3.0 has no base64url mode).
#pragma once
#include <optional>
#include <string>
#include <string_view>

namespace shimlet {

std::string base64_encode(std::string_view in);
std::optional<std::string> base64_decode(std::string_view in);
// RFC 4648 section 5, no padding (as JWS uses).
std::string base64url_encode(std::string_view in);
std::optional<std::string> base64url_decode(std::string_view in);

// Lower-case hex of bytes.
std::string hex_encode(std::string_view in);
// Cryptographically random bytes (OpenSSL RAND_bytes); throws on failure.
std::string random_bytes(size_t n);
// SHA-256 digest (32 raw bytes).
std::string sha256(std::string_view in);

}  // namespace shimlet
