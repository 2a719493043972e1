#include "common/error.h"

#include <errno.h>

namespace shimlet {

std::system_error sys_error(const std::string& what, int err) {
  if (err < 0) err = errno;
  return std::system_error(err, std::generic_category(), what);
}

}  // namespace shimlet
