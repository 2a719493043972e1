// Errors: one rule for the whole tree.
//
// 1. Inside a component a failure throws, with context: what was being done,
//    on what, and why ("open /run/shimlet/c1/shim.json: No such file or
//    directory").
//    - sys_error(what) for a failed call that sets errno: a
//      std::system_error carrying errno (code()) and "WHAT: strerror".
//    - Error(what) for everything else: validation, protocol, a peer's
//      refusal, a library that reports in its own terms (OpenSSL:
//      openssl_error() in common/openssl.h).
//    A caller catches only to add context it alone has, or at a boundary.
// 2. errno is read right after the call that failed, before anything that
//    may change it (another call, a destructor, a `catch (...)`): keep it
//    (`int e = errno;`) and pass it on (`sys_error(what, e)`) when anything
//    runs in between.
// 3. Nothing throws across C: in callbacks that C libraries call (libevent,
//    nghttp2, OpenSSL, wslay, libseccomp), between fork and execve, and in
//    signal handlers a failure is a returned value (an errno, a status, a
//    result struct) that the C++ side then throws or logs. A process's top
//    level (main) catches, logs one line and exits with its documented code.
// 4. Where a failure is an expected answer rather than an error (a file that
//    may be absent, a peer that refused), the function returns it: an
//    std::optional for "absent", a named result struct when the caller
//    branches on why (a status, not the message's text). Never an empty
//    string meaning success, never a `std::string* why` out-parameter.
// 5. Every call that can fail has its result checked (event_new, fcntl,
//    setsockopt...), or a comment says why it does not matter.
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
