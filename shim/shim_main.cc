// shimlet: the per-container shim daemon. Started by shimlet-hook; see shim/shim.h.
#include <stdlib.h>
#include <unistd.h>

#include <exception>
#include <string>
#include <string_view>

#include "common/version.h"
#include "shim/shim.h"

int main(int argc, char** argv) {
  if (argc == 2 && std::string_view(argv[1]) == "--version") {
    static constexpr char kLine[] = "shimlet " SHIMLET_VERSION "\n";
    return ::write(1, kLine, sizeof kLine - 1) == sizeof kLine - 1 ? 0 : 1;
  }
  shimlet::shim::Options opt;
  try {
    opt = shimlet::shim::parse_args(argc, argv);
  } catch (const std::exception& e) {
    std::string line = std::string(e.what()) + "\n";
    ssize_t r = ::write(2, line.data(), line.size());
    (void)r;
    return 2;
  }
  return shimlet::shim::run(opt);
}
