// A scratch directory for a unit test, removed with its contents on scope exit.
#pragma once
#include <stdlib.h>

#include <cerrno>
#include <filesystem>
#include <string>
#include <system_error>

namespace shimlet::test {

struct TempDir {
  std::string path;
  explicit TempDir(const std::string& prefix = "shimlet-test") {
    std::string t = "/tmp/" + prefix + ".XXXXXX";
    if (!mkdtemp(t.data())) throw std::system_error(errno, std::generic_category(), "mkdtemp " + t);
    path = t;
  }
  ~TempDir() {
    std::error_code ec;  // a test's leftovers never turn into a second failure
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace shimlet::test
