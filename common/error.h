// Errors carry context: what failed, on which path/pid, and errno's text.
#pragma once
#include <stdexcept>
#include <string>
#include <system_error>

namespace shimlet {

// std::system_error for errno with a message "WHAT: strerror(errno)".
std::system_error sys_error(const std::string& what, int err = -1 /* -1: use errno */);

// Plain error with a message; use for protocol/validation failures.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace shimlet
