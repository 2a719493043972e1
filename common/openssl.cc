#include "common/openssl.h"

#include <openssl/err.h>

namespace shimlet {

std::string openssl_error() {
  unsigned long e = ERR_get_error();
  std::string out = "no OpenSSL error";
  if (e) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    out = buf;
  }
  ERR_clear_error();
  return out;
}

std::string bio_string(BIO* b) {
  char* data = nullptr;
  long n = BIO_get_mem_data(b, &data);
  return n > 0 ? std::string(data, static_cast<size_t>(n)) : std::string();
}

}  // namespace shimlet
