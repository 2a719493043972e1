#include "common/text.h"

namespace shimlet {

std::string one_line(std::string_view s, size_t max) {
  std::string out;
  for (unsigned char c : s) {
    if (out.size() >= max) break;
    out += (c < 0x20 || c == 0x7f) ? ' ' : static_cast<char>(c);
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

}  // namespace shimlet
