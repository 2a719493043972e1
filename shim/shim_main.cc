// shimlet: the per-container shim daemon. Started by shimlet-hook; see shim/shim.h.
#include <stdlib.h>
#include <unistd.h>

#include <exception>
#include <string>

#include "shim/shim.h"

int main(int argc, char** argv) {
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
