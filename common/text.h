// Text from elsewhere (a server, a file, a peer) on one of our lines.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace shimlet {

// One line: control characters become spaces, at most max bytes, no
// trailing blanks.
std::string one_line(std::string_view s, size_t max = 1024);

}  // namespace shimlet
