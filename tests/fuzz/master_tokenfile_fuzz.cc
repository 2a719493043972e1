// kube-apiserver static token file (CSV) parser and bearer authentication.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "master/authn.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string in(reinterpret_cast<const char*>(data), size);
  try {
    auto tokens = shimlet::master::parse_token_file(in);
    shimlet::master::Authenticator a;
    a.set_tokens(tokens);
    a.authenticate("Bearer " + in.substr(0, in.find(',')), nullptr);
  } catch (const shimlet::Error&) {
  }
  return 0;
}
